"""Unstructured pruning: ``Conv(x; W) -> Conv(x; W * M)``, the zeros written into ``W``.

Like ``torch.nn.utils.prune`` followed by ``prune.remove``, in one step: ``amount`` of the
weights of every Conv and Linear layer (the one inside a fused unit too; weights only, not
biases, not BatchNorm) are set to zero in the parameters themselves, so there are no masks,
no forward hooks and no ``weight_orig``/``weight_mask`` in the state dict.

With ``scope="global"`` every weight of every layer is ranked together (one threshold);
with ``scope="local"`` each layer loses ``amount`` of its own weights. Weights are ranked by
``importance``: ``"l1"`` (|w|) or ``"random"`` (seeded), and the ``round(amount * n)``
lowest of the ``n`` ranked are zero afterwards (exactly that many in a model that had no
zeros): ties go to the lowest flat index, and weights that are already zero rank first and
count toward the target, so a second run at the same amount changes nothing. A weight
tensor shared by several layers is counted once. The achieved sparsity per layer goes into
``report.tables["sparsify"]``.

Example::

    result = fxcomp.compile(model, x, passes=[fxcomp.passes.sparsify(0.8)])
    table = result.report.table("sparsify")  # layer, weights, zeros, sparsity
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.nn.fused import weighted_layer
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult

__all__ = ["SparsifyOptions", "lowest", "sparsify", "sparsify_weights", "weight_tensors"]

log = logging.getLogger(__name__)

SCOPES = ("global", "local")
IMPORTANCES = ("l1", "random")


@dataclass(frozen=True)
class SparsifyOptions:
    """How many weights to zero, over which weights they are ranked, and by what."""

    amount: float = 0.5
    scope: str = "global"
    importance: str = "l1"
    seed: int = 0

    def check(self) -> None:
        """Raise ``InputError`` saying which option is not usable."""
        if isinstance(self.amount, bool) or not isinstance(self.amount, (int, float)):
            raise InputError(f"sparsify amount must be a number, got {self.amount!r}")
        if not 0 <= self.amount < 1:
            raise InputError(
                f"sparsify amount must be in [0, 1), got {self.amount}",
                hint="amount is the fraction of weights set to zero, e.g. 0.5",
            )
        if self.scope not in SCOPES:
            raise InputError(f"unknown sparsify scope {self.scope!r}", hint="use global or local")
        if self.importance not in IMPORTANCES:
            raise InputError(
                f"unknown sparsify importance {self.importance!r}", hint="use l1 or random"
            )


def weight_tensors(gm: GraphModule) -> dict[str, torch.nn.Parameter]:
    """The weight of every Conv/Linear layer of ``gm`` (inside fused units too), by the
    qualified name of the first module that uses it; a shared weight appears once.

    Example::

        sum(w.numel() for w in weight_tensors(gm).values())
    """
    found: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in gm.named_modules():
        layer = weighted_layer(module)
        if layer is None or id(layer.weight) in seen:
            continue
        seen.add(id(layer.weight))
        found[name] = layer.weight
    return found


def _scores(
    weights: list[torch.Tensor], options: SparsifyOptions, generator: torch.Generator
) -> torch.Tensor:
    """One importance score per weight, flattened and concatenated; zeros score lowest."""
    dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights), torch.float32)
    flat = torch.cat([w.detach().flatten().to(dtype) for w in weights])
    if options.importance == "random":
        scores = torch.rand(flat.numel(), generator=generator, dtype=torch.float64)
        return torch.where(flat == 0, -1.0, scores.to(flat.device))
    return flat.abs()


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A boolean mask of exactly ``count`` lowest ``scores``; ties go to the lowest index.

    Example::

        lowest(torch.tensor([3.0, 1.0, 1.0, 2.0]), 2)  # tensor([False, True, True, False])
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return mask
    threshold = scores.kthvalue(count).values
    mask = scores < threshold
    ties = (scores == threshold).nonzero().flatten()
    mask[ties[: count - int(mask.sum())]] = True
    return mask


def _zero(weight: torch.Tensor, mask: torch.Tensor) -> bool:
    """Zero ``weight`` where ``mask`` is set, in place; True if any weight was nonzero there."""
    mask = mask.view(weight.shape)
    if not bool((weight.detach()[mask] != 0).any()):
        return False
    with torch.no_grad():
        weight.masked_fill_(mask, 0)
    return True


def _masks(
    weights: list[torch.Tensor], options: SparsifyOptions, generator: torch.Generator
) -> list[torch.Tensor]:
    """One flat mask per weight tensor: the weights ``options`` zeroes."""
    if options.scope == "local":
        return [
            lowest(_scores([w], options, generator), round(options.amount * w.numel()))
            for w in weights
        ]
    scores = _scores(weights, options, generator)
    mask = lowest(scores, round(options.amount * scores.numel()))
    return list(mask.split([w.numel() for w in weights]))


def sparsify_weights(
    gm: GraphModule, ctx: CompileContext, *, options: SparsifyOptions
) -> PassResult:
    """Zero ``options.amount`` of the Conv/Linear weights of ``gm`` in place; record the
    sparsity of each layer in ``ctx.state.report.tables["sparsify"]``.

    Example::

        sparsify_weights(gm, ctx, options=SparsifyOptions(0.5, scope="local"))
    """
    options.check()
    layers = weight_tensors(gm)
    weights = list(layers.values())
    modified = False
    if weights:
        generator = torch.Generator().manual_seed(options.seed)
        for weight, mask in zip(weights, _masks(weights, options, generator), strict=True):
            modified |= _zero(weight, mask)
    rows = []
    for name, weight in layers.items():
        n, z = weight.numel(), int((weight.detach() == 0).sum())
        rows.append({"layer": name, "weights": n, "zeros": z, "sparsity": f"{z / n:.3f}"})
    ctx.state.report.tables["sparsify"] = rows
    zeros, total = sum(r["zeros"] for r in rows), sum(r["weights"] for r in rows)
    log.info("sparsify: %d of %d weights are zero in %d layers", zeros, total, len(rows))
    return PassResult(gm, modified)


def sparsify(
    amount: float = 0.5, *, scope: str = "global", importance: str = "l1", seed: int = 0
) -> Pass:
    """Zero ``amount`` of the Conv/Linear weights, ranked by ``importance`` over ``scope``.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.sparsify(0.5, scope="local")])
    """
    options = SparsifyOptions(amount, scope, importance, seed)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return sparsify_weights(gm, ctx, options=options)

    return Pass("sparsify", run, run_before=("quantize", "qat"), options=options)
