"""SmoothQuant: ``C(f(P(x))) -> C'(f(P'(x)))`` with activation outliers moved into weights.

For each producer whose output channels can be rescaled against its consumers
(``fxcomp.nn.scaling``: a Conv/Linear pair, or a LayerNorm feeding only Linear layers, the
Transformer case ``LN -> q_proj, k_proj, v_proj`` after ``unpack_attention``, or
``LN -> fc1``), the consumers' input activations are measured on ``data`` and channel
``c`` is scaled by ``s_c = max|X_c|**alpha / max|W_c|**(1 - alpha)`` (Xiao et al.), ``X``
the consumers' input and ``W_c`` their weights on that channel, the largest over all the
consumers: the producer's output (so the activation) is divided by ``s_c`` (a LayerNorm's
weight and bias), every consumer's weights multiplied by it. With ``alpha=0.5`` the
activation and the weights share the outlier; the function is unchanged. Run it after
``fuse`` and ``unpack_attention`` and before ``quantize``.
``report.tables["smooth_quant"]`` gives each pair's activation spread (largest over
smallest channel range) before and after.

Example::

    passes=[fuse(), unpack_attention(), smooth_quant(batches, alpha=0.5), quantize(batches)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.nn.fused import weighted_layer
from fxcomp.nn.scaling import ScalePair, rescale_, scale_pairs
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.runtime.training import split_batch

__all__ = ["SmoothOptions", "smooth_layers", "smooth_quant"]

_FLOOR = 1e-8


@dataclass(frozen=True)
class SmoothOptions:
    """The batches the input ranges are measured on, and how much of each outlier moves
    into the weights."""

    data: Iterable[Any] | None = None
    alpha: float = 0.5


def _channel_ranges(layer: torch.nn.Module, x: torch.Tensor, channels: int) -> torch.Tensor:
    """The largest magnitude of each input channel of ``layer`` in ``x`` (a Linear's
    channels are the last axis, a Conv's the second)."""
    x = x.detach().abs()
    if isinstance(layer, torch.nn.Linear):
        return x.reshape(-1, channels).amax(0)
    return x.transpose(0, 1).reshape(channels, -1).amax(1)


def _input_ranges(
    gm: GraphModule, pairs: list[ScalePair], batches: list[tuple[Any, ...]]
) -> dict[str, torch.Tensor]:
    """Per pair (by producer), the largest magnitude of each channel its consumers read."""
    ranges: dict[str, torch.Tensor] = {}

    def record(pair: ScalePair, layer: torch.nn.Module):
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = _channel_ranges(layer, args[0], pair.channels)
            name = pair.producer
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x

        return hook

    hooks = []
    for pair in pairs:  # every consumer reads the same tensor: the first one is watched
        module = gm.get_submodule(pair.consumers[0])
        hooks.append(module.register_forward_pre_hook(record(pair, weighted_layer(module))))
    try:
        with torch.no_grad():
            for inputs in batches:
                gm(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _weight_ranges(gm: GraphModule, pair: ScalePair) -> torch.Tensor:
    """The largest weight magnitude on each shared channel, over all consumers."""
    columns = []
    for name in pair.consumers:
        weight = weighted_layer(gm.get_submodule(name)).weight.detach().abs()
        columns.append(weight.transpose(0, 1).reshape(pair.channels, -1).amax(1))
    return torch.stack(columns).amax(0)


def smooth_layers(
    gm: GraphModule, ctx: CompileContext, *, data: Iterable[Any] | None, alpha: float
) -> PassResult:
    """Smooth every rescalable pair of ``gm`` on ``data`` (module docstring)."""
    data = data if data is not None else ctx.config.calibration_data
    if data is None:
        raise InputError("smooth_quant needs data to measure activations on")
    count = len(gm.graph.find_nodes(op="placeholder"))
    batches = [split_batch(b, count, i)[0] for i, b in enumerate(data)]
    pairs = scale_pairs(gm, norms=True)
    ranges = _input_ranges(gm, pairs, batches)
    rows = []
    for pair in pairs:
        activation = ranges[pair.producer]
        weight = _weight_ranges(gm, pair)
        live = (activation > _FLOOR) & (weight > _FLOOR)
        scale = activation.clamp(min=_FLOOR) ** alpha / weight.clamp(min=_FLOOR) ** (1 - alpha)
        scale = torch.where(live, scale, torch.ones_like(scale))
        rescale_(gm, pair, scale)
        after = activation / scale
        rows.append(
            {
                "producer": pair.producer,
                "consumer": ", ".join(pair.consumers),
                "channels": pair.channels,
                "activation_spread": f"{_spread(activation):.3g} -> {_spread(after):.3g}",
            }
        )
    if rows:
        ctx.state.report.tables["smooth_quant"] = rows
    return PassResult(gm, modified=bool(rows))


def _spread(ranges: torch.Tensor) -> float:
    return float(ranges.max() / ranges.clamp(min=_FLOOR).min())


def smooth_quant(data: Iterable[Any] | None = None, *, alpha: float = 0.5) -> Pass:
    """SmoothQuant on every rescalable layer pair and LayerNorm -> Linear group, measured
    on ``data`` (by default the ``calibration_data`` given to ``compile``; module docstring).

    Example::

        passes=[fuse(), smooth_quant(batches), quantize(batches)]
    """
    if not 0 <= alpha <= 1:
        raise InputError(f"smooth_quant alpha must be in [0, 1], got {alpha}")
    options = SmoothOptions(data, alpha)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return smooth_layers(gm, ctx, data=options.data, alpha=options.alpha)

    return Pass(
        "smooth_quant",
        run,
        run_after=("fuse", "prune"),
        run_before=("quantize", "qat"),
        options=options,
    )
