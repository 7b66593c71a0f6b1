"""SmoothQuant: ``C(f(P(x))) -> C'(f(P'(x)))`` with activation outliers moved into weights.

For each pair of layers whose shared channels can be rescaled (``fxcomp.scaling``), the
consumer's input activations are measured on ``data`` and channel ``c`` is scaled by
``s_c = max|X_c|**alpha / max|W_c|**(1 - alpha)`` (Xiao et al.), ``X`` the consumer's
input and ``W_c`` its weights on that channel: the producer's output (so the activation)
is divided by ``s_c``, the consumer's weights multiplied by it. With ``alpha=0.5`` the
activation and the weight share the outlier; the function is unchanged. Run it after
``fuse`` and before ``quantize``. ``report.tables["smooth_quant"]`` gives each pair's
activation spread (largest over smallest channel range) before and after.

Example::

    passes=[fuse(), smooth_quant(batches, alpha=0.5), quantize(batches)]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import GraphModule

from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.fused import weighted_layer
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.scaling import ScalePair, rescale_, scale_pairs
from fxcomp.training import split_batch

__all__ = ["smooth_layers", "smooth_quant"]

_FLOOR = 1e-8


def _input_ranges(
    gm: GraphModule, pairs: list[ScalePair], batches: list[tuple[Any, ...]]
) -> dict[str, torch.Tensor]:
    """Per pair, the largest magnitude of each channel of the consumer's input."""
    ranges: dict[str, torch.Tensor] = {}

    def record(name: str, channels: int):
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().transpose(0, 1).reshape(channels, -1).amax(1)
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x

        return hook

    hooks = [
        gm.get_submodule(p.consumer).register_forward_pre_hook(record(p.consumer, p.channels))
        for p in pairs
    ]
    try:
        with torch.no_grad():
            for inputs in batches:
                gm(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def smooth_layers(
    gm: GraphModule, ctx: CompileContext, *, data: Iterable[Any] | None, alpha: float
) -> PassResult:
    """Smooth every rescalable pair of ``gm`` on ``data`` (module docstring)."""
    data = data if data is not None else ctx.calibration_data
    if data is None:
        raise InputError("smooth_quant needs data to measure activations on")
    count = len(gm.graph.find_nodes(op="placeholder"))
    batches = [split_batch(b, count, i)[0] for i, b in enumerate(data)]
    pairs = scale_pairs(gm)
    ranges = _input_ranges(gm, pairs, batches)
    rows = []
    for pair in pairs:
        activation = ranges[pair.consumer]
        weight = weighted_layer(gm.get_submodule(pair.consumer)).weight.detach().abs()
        weight = weight.transpose(0, 1).reshape(pair.channels, -1).amax(1)
        live = (activation > _FLOOR) & (weight > _FLOOR)
        scale = activation.clamp(min=_FLOOR) ** alpha / weight.clamp(min=_FLOOR) ** (1 - alpha)
        scale = torch.where(live, scale, torch.ones_like(scale))
        rescale_(gm, pair, scale)
        after = activation / scale
        rows.append(
            {
                "producer": pair.producer,
                "consumer": pair.consumer,
                "channels": pair.channels,
                "activation_spread": f"{_spread(activation):.3g} -> {_spread(after):.3g}",
            }
        )
    if rows:
        ctx.report.tables["smooth_quant"] = rows
    return PassResult(gm, modified=bool(rows))


def _spread(ranges: torch.Tensor) -> float:
    return float(ranges.max() / ranges.clamp(min=_FLOOR).min())


def smooth_quant(data: Iterable[Any] | None = None, *, alpha: float = 0.5) -> Pass:
    """SmoothQuant on every rescalable layer pair, measured on ``data`` (by default the
    ``calibration_data`` given to ``compile``; module docstring).

    Example::

        passes=[fuse(), smooth_quant(batches), quantize(batches)]
    """
    if not 0 <= alpha <= 1:
        raise InputError(f"smooth_quant alpha must be in [0, 1], got {alpha}")

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return smooth_layers(gm, ctx, data=data, alpha=alpha)

    return Pass("smooth_quant", run, run_after=("fuse", "prune"), run_before=("quantize", "qat"))
