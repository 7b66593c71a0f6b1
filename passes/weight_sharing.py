"""Weight sharing (palettization): ``Conv(x; W) -> SharedWeightLayer(Conv)(x; LUT[I])``.

Each Conv/Linear weight (the one inside a fused unit too) is clustered into ``2**bits``
shared values by 1-D k-means (scikit-learn, initialised at evenly spaced quantiles, so the
result is deterministic); the layer then holds a lookup table of those values and, per
weight, the index of its value. It computes with ``LUT[I]``, which is what it would store
on disk: ``bits`` per weight, packed, plus the table. Biases stay float. With ``data``
(labeled batches) the tables and biases are then fine-tuned for ``epochs`` with the indices
fixed, as Deep Compression does (the shared training loop of ``fxcomp.runtime.training``).
``report.tables["share_weights"]`` gives each layer's weight SQNR and its storage against
float32 and against INT8 per output channel (one byte per weight and a float32 scale per
channel); ``total`` sums them.

Example::

    result = fxcomp.compile(model, x, passes=[fuse(), share_weights(bits=4)])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import module_of, replace_module
from fxcomp.nn.fused import weighted_layer
from fxcomp.nn.stored_weights import SharedWeightLayer
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.runtime.parity import sqnr
from fxcomp.runtime.training import Supervised, TrainOptions, fit

__all__ = ["ShareOptions", "share_weights"]


@dataclass(frozen=True)
class ShareOptions:
    """Bits per weight index: ``2**bits`` shared values per layer."""

    bits: int = 4
    epochs: int = 1
    lr: float = 1e-3
    progress: bool = True
    data: Iterable[Any] | None = None  # labeled batches to fine-tune the tables on

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise InputError(f"share_weights bits must be an integer in [1, 8], got {self.bits!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1 or not self.lr > 0:
            raise InputError("share_weights epochs must be a positive integer and lr positive")


def share_layer_weights(
    gm: GraphModule, ctx: CompileContext, *, options: ShareOptions
) -> PassResult:
    """Cluster every Conv/Linear weight of ``gm``, then fine-tune on ``options.data`` if
    given (module docstring)."""
    options.check()
    data = options.data
    rows, changed, originals = [], False, {}
    totals = {"weights": 0, "shared_bytes": 0, "int8_bytes": 0, "float32_bytes": 0}
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        inner = weighted_layer(module)
        if inner is None or isinstance(module, SharedWeightLayer):
            continue
        weight = inner.weight.detach().clone()
        originals[str(node.target)] = weight
        shared = SharedWeightLayer(module, options.bits)
        replace_module(gm, str(node.target), shared)
        changed = True
        sizes = {
            "weights": weight.numel(),
            "shared_bytes": shared.storage_bytes(),
            "int8_bytes": weight.numel() + 4 * weight.shape[0],
            "float32_bytes": 4 * weight.numel(),
        }
        for key, value in sizes.items():
            totals[key] += value
        rows.append(
            {
                "layer": str(node.target),
                **sizes,
                "vs_int8": f"{sizes['shared_bytes'] / sizes['int8_bytes']:.3f}",
                "weight_sqnr_db": f"{sqnr(weight, shared.weight()):.2f}",
            }
        )
    if data is not None and changed:
        training = TrainOptions(options.epochs, options.lr, progress=options.progress)
        fit(Supervised(gm, None, "share_weights"), gm, data, training, desc="share_weights")
        for row, (name, weight) in zip(rows, originals.items(), strict=True):
            row["weight_sqnr_db"] = f"{sqnr(weight, gm.get_submodule(name).weight()):.2f}"
    if rows:
        share = f"{totals['shared_bytes'] / totals['int8_bytes']:.3f}"
        rows.append({"layer": "total", **totals, "vs_int8": share, "weight_sqnr_db": ""})
        ctx.state.report.tables["share_weights"] = rows
    return PassResult(gm, modified=changed)


def share_weights(
    *,
    bits: int = 4,
    data: Iterable[Any] | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    progress: bool = True,
) -> Pass:
    """Cluster each Conv/Linear weight into ``2**bits`` shared values, then fine-tune the
    tables on ``data`` if given (module docstring).

    Example::

        passes=[fuse(), share_weights(bits=4, data=train_batches)]
    """
    options = ShareOptions(bits, epochs, lr, progress, data)
    options.check()

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return share_layer_weights(gm, ctx, options=options)

    return Pass(
        "share_weights",
        run,
        run_after=("fuse", "prune", "distill"),
        run_before=("quantize",),
        options=options,
    )
