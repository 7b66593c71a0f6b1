"""Bias correction: ``Conv_q(x) + b -> Conv_q(x) + b - E[(W_q - W) x]``.

Rounding a layer's weights shifts the mean of its output: ``E[(W_q - W) x]`` per output
channel is rarely zero (Nagel et al., data-free quantization; Banner et al.). On the
reference graph (after ``freeze``) this pass measures that shift on ``data``, with each
layer's inputs as the quantized graph gives them, and subtracts it from the layer's bias
(adding a bias where there was none), before the activation a fused unit applies. It runs
inside ``quantize(..., bias_correction=True)``; the reference outputs the backends verify
against are recomputed. ``report.tables["correct_bias"]`` gives each layer's largest
correction against its output's spread.

Example::

    passes=[fuse(), quantize(batches, per_channel=False, bias_correction=True)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import module_of
from fxcomp.nn.fused import apply_weight
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.quant.reference import QuantizedWeightLayer, fake_quantize
from fxcomp.runtime.training import split_batch

__all__ = ["BiasCorrectionOptions", "correct_bias"]


@dataclass(frozen=True)
class BiasCorrectionOptions:
    """The batches the output shifts are measured on (None: the compile's calibration data)."""

    data: Iterable[Any] | None = None


def _shift(layer: QuantizedWeightLayer, x: torch.Tensor) -> torch.Tensor:
    """The per-channel mean of what weight rounding adds to the layer's output on ``x``."""
    inner = layer.weighted
    weight = inner.weight.detach()
    error = (
        fake_quantize(weight, layer.weight_scale, layer.weight_zero_point, layer.scheme) - weight
    )
    out = apply_weight(inner, x, error, None)
    if isinstance(inner, nn.Linear):
        return out.reshape(-1, out.shape[-1]).mean(0)
    return out.transpose(0, 1).reshape(out.shape[1], -1).mean(1)


def correct_layer_biases(
    gm: GraphModule, ctx: CompileContext, *, data: Iterable[Any] | None
) -> PassResult:
    """Subtract each quantized layer's mean rounding shift from its bias (module docstring)."""
    data = data if data is not None else ctx.config.calibration_data
    if data is None:
        raise InputError("correct_bias needs data to measure the shifts on")
    layers = {
        str(n.target): module_of(gm, n)
        for n in gm.graph.nodes
        if isinstance(module_of(gm, n), QuantizedWeightLayer)
    }
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def record(name: str):
        def hook(module: QuantizedWeightLayer, args: tuple[Any, ...]) -> None:
            shift = _shift(module, args[0].detach())
            sums[name] = sums[name] + shift if name in sums else shift
            counts[name] += 1

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
    count = len(gm.graph.find_nodes(op="placeholder"))
    try:
        with torch.no_grad():
            for index, batch in enumerate(data):
                gm(*split_batch(batch, count, index)[0])
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for name, layer in layers.items():
        if not counts[name]:
            continue
        correction = sums[name] / counts[name]
        inner = layer.weighted
        with torch.no_grad():
            if inner.bias is None:
                inner.bias = nn.Parameter(-correction)
            else:
                inner.bias.sub_(correction)
        rows.append({"layer": name, "largest_correction": f"{correction.abs().max():.3g}"})
    if rows:
        ctx.state.report.tables["correct_bias"] = rows
        with torch.no_grad():
            ctx.state.reference_outputs = gm(*ctx.config.example_inputs)
    return PassResult(gm, modified=bool(rows))


def correct_bias(data: Iterable[Any] | None = None) -> Pass:
    """Bias correction of the reference graph on ``data`` (module docstring).

    Example::

        passes=[fuse(), observe(), calibrate(data), freeze(), correct_bias(data)]
    """

    options = BiasCorrectionOptions(data)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return correct_layer_biases(gm, ctx, data=options.data)

    return Pass("correct_bias", run, run_after=("freeze",), run_before=("lower",), options=options)
