"""Weight sharing (palettization): ``Conv(x; W) -> SharedWeightLayer(Conv)(x; LUT[I])``.

Each Conv/Linear weight (the one inside a fused unit too) is clustered into ``2**bits``
shared values by 1-D k-means (scikit-learn, initialised at evenly spaced quantiles, so the
result is deterministic); the layer then holds a lookup table of those values and, per
weight, the index of its value. It computes with ``LUT[I]``, which is what it would store
on disk: ``bits`` per weight, packed, plus the table. Biases stay float. With ``data``
(labeled batches) the tables and biases are then fine-tuned for ``epochs`` with the indices
fixed, as Deep Compression does (the shared training loop of ``fxcomp.training``).
``report.tables["share_weights"]`` gives each layer's weight SQNR and its storage against
float32 and against INT8 per output channel (one byte per weight and a float32 scale per
channel); ``total`` sums them.

Example::

    result = fxcomp.compile(model, x, passes=[fuse(), share_weights(bits=4)])
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn
from torch.fx import GraphModule

from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.fused import ConvReLU, FusedModule, LinearReLU, apply_weight, weighted_layer
from fxcomp.graph import module_of, replace_module
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.training import Supervised, fit
from fxcomp.verify import sqnr

__all__ = ["ShareOptions", "SharedWeightLayer", "share_layer_weights", "share_weights"]


@dataclass(frozen=True)
class ShareOptions:
    """Bits per weight index: ``2**bits`` shared values per layer."""

    bits: int = 4
    epochs: int = 1
    lr: float = 1e-3
    progress: bool = True

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise InputError(f"share_weights bits must be an integer in [1, 8], got {self.bits!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1 or not self.lr > 0:
            raise InputError("share_weights epochs must be a positive integer and lr positive")


class SharedWeightLayer(FusedModule):
    """A Conv/Linear (fused with ReLU or not) whose weight is ``lut[indices]``.

    Example::

        SharedWeightLayer(nn.Linear(4, 2), bits=2)(torch.randn(3, 4))
    """

    def __init__(self, layer: nn.Module, bits: int) -> None:
        super().__init__()
        inner = weighted_layer(layer)
        if inner is None:
            raise TypeError(f"cannot share the weights of {type(layer).__name__}")
        weight = inner.weight.detach()
        lut, indices = _cluster(weight, 2**bits)
        self.bits = bits
        self.relu = isinstance(layer, (ConvReLU, LinearReLU))
        del inner.weight  # the layer keeps its configuration and bias; the weight lives here
        self.layer = inner
        self.lut = nn.Parameter(lut)
        self.register_buffer("indices", indices)

    def weight(self) -> torch.Tensor:
        """The weight the layer computes with."""
        return self.lut[self.indices.long()]

    def storage_bytes(self) -> int:
        """Bytes to store the weight: the packed indices and the float32 table."""
        return math.ceil(self.indices.numel() * self.bits / 8) + 4 * self.lut.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_weight(self.layer, x, self.weight(), self.layer.bias)
        return torch.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, values={self.lut.numel()}"


def _cluster(weight: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = weight.flatten().double().numpy()
    distinct = np.unique(values)
    if len(distinct) <= clusters:
        lut = distinct
    else:
        start = np.quantile(values, (np.arange(clusters) + 0.5) / clusters).reshape(-1, 1)
        fit = KMeans(clusters, init=np.unique(start).reshape(-1, 1), n_init=1, random_state=0)
        lut = np.sort(fit.fit(values.reshape(-1, 1)).cluster_centers_.ravel())
    edges = (lut[1:] + lut[:-1]) / 2
    indices = np.searchsorted(edges, values).reshape(weight.shape)
    return torch.tensor(lut, dtype=weight.dtype), torch.tensor(indices, dtype=torch.uint8)


def share_layer_weights(
    gm: GraphModule,
    ctx: CompileContext,
    *,
    options: ShareOptions = ShareOptions(),
    data: Iterable[Any] | None = None,
) -> PassResult:
    """Cluster every Conv/Linear weight of ``gm``, then fine-tune on ``data`` if given
    (module docstring)."""
    options.check()
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
        fit(
            Supervised(gm, None, "share_weights"),
            gm,
            data,
            epochs=options.epochs,
            lr=options.lr,
            desc="share_weights",
            progress=options.progress,
        )
        for row, (name, weight) in zip(rows, originals.items(), strict=True):
            row["weight_sqnr_db"] = f"{sqnr(weight, gm.get_submodule(name).weight()):.2f}"
    if rows:
        share = f"{totals['shared_bytes'] / totals['int8_bytes']:.3f}"
        rows.append({"layer": "total", **totals, "vs_int8": share, "weight_sqnr_db": ""})
        ctx.report.tables["share_weights"] = rows
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
    options = ShareOptions(bits, epochs, lr, progress)
    options.check()

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return share_layer_weights(gm, ctx, options=options, data=data)

    return Pass(
        "share_weights", run, run_after=("fuse", "prune", "distill"), run_before=("quantize",)
    )
