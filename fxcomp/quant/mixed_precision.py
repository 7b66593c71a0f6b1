"""Mixed precision: keep the layers that hurt most in float until a target is met.

``choose_precision`` runs before ``insert_observers`` inside ``quantize``. It quantizes a
copy of the graph with the pipeline's own steps (observe, calibrate, freeze), ranks the
Conv/Linear layers, and the quantized ops that have a grid of their own (residual adds,
multiplies, cat...: a Transformer's residual stream runs through its adds), by the output SQNR
when each alone is quantized (``fxcomp.quant.sensitivity``), then greedily moves the most
harmful to float, re-quantizing the copy each time, until the
output's SQNR against float on the data reaches ``target_sqnr`` dB, or ``eval_fn``'s
accuracy is at most ``max_accuracy_drop`` below float. The layers it chose are recorded in
the graph slot ``FLOAT_LAYERS`` (module names, and node names for ops: ``add_3``), which
``insert_observers`` skips; the graph itself is unchanged.
``report.tables["mixed_precision"]`` has each step: the float layers and ops, the figure
reached, the extra weight bytes float costs, and the share of multiply-accumulates left in
float (what the INT8 speed-up loses). With ``latency_rounds`` (engines with kernels: x86,
fbgemm, qnnpack) the float graph, the all-INT8 graph and the chosen mix are lowered, frozen
as TorchScript and timed interleaved on the example inputs (``fxcomp.runtime.latency``):
``report.tables["mixed_precision_latency"]`` gives each one's median and its speed-up over
float, the cost of the float layers in time rather than in MACs.

Example::

    passes=[fuse(), quantize(batches, target_sqnr=30.0, latency_rounds=50)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import module_of
from fxcomp.nn.fused import weighted_layer
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.quant.config import FLOAT_LAYERS, QuantConfig
from fxcomp.quant.lowering import lower_to_kernels, script
from fxcomp.quant.pipeline import quantize_copy
from fxcomp.quant.sensitivity import flat_outputs, input_batches, measure_layers
from fxcomp.runtime.latency import median_latency
from fxcomp.runtime.parity import sqnr

__all__ = ["PrecisionOptions", "choose_float_layers", "choose_precision"]

EvalFn = Callable[[nn.Module], float]


@dataclass(frozen=True)
class PrecisionOptions:
    """The target: an output SQNR in dB, or an accuracy drop that ``eval_fn`` measures;
    ``latency_rounds`` > 0 times the result against float and all-INT8."""

    target_sqnr: float | None = None
    max_accuracy_drop: float | None = None
    eval_fn: EvalFn | None = None
    latency_rounds: int = 0

    def check(self) -> None:
        """Raise ``InputError`` unless exactly one target is set, with what it needs."""
        if (self.target_sqnr is None) == (self.max_accuracy_drop is None):
            raise InputError("mixed precision takes one target: target_sqnr or max_accuracy_drop")
        if self.max_accuracy_drop is not None and self.eval_fn is None:
            raise InputError(
                "max_accuracy_drop needs eval_fn", hint="eval_fn(model) -> accuracy in percent"
            )
        if self.latency_rounds < 0:
            raise InputError(f"latency_rounds must be >= 0, got {self.latency_rounds}")


def _macs(gm: GraphModule) -> dict[str, int]:
    """Multiply-accumulates per sample of each Conv/Linear, from the recorded shapes."""
    macs = {}
    for node in gm.graph.nodes:
        layer = weighted_layer(module_of(gm, node))
        meta = node.meta.get("tensor_meta")
        if layer is None or not hasattr(meta, "shape") or not meta.shape:
            continue
        per_output = layer.weight[0].numel()  # (in / groups) * kernel, or in_features
        macs[str(node.target)] = math.prod(meta.shape[1:]) * per_output
    return macs


def _latency_rows(
    gm: GraphModule,
    ctx: CompileContext,
    data: list[Any],
    chosen: list[str],
    rounds: int,
    config: QuantConfig,
) -> list[dict[str, Any]]:
    """Float, all-INT8 and the chosen mix as frozen TorchScript, timed interleaved."""
    inputs = ctx.config.example_inputs
    models = {"float": script(gm, inputs, config.engine)}
    mixes = {"all INT8": ()} | ({f"{len(chosen)} float": tuple(chosen)} if chosen else {})
    for name, skip in mixes.items():
        trial = replace(config, skip=(*config.skip, *skip))
        reference = quantize_copy(gm, trial, data, inputs)
        scratch = CompileContext.from_inputs(inputs)
        lowered = lower_to_kernels(reference, scratch).graph_module
        models[name] = script(lowered, inputs, config.engine)
    ms = median_latency(models, [ctx.config.example_inputs], rounds)
    base = ms["float"][0]
    return [
        {"model": name, "latency_ms": f"{value[0]:.3f}", "speed-up": f"{base / value[0]:.2f}x"}
        for name, value in ms.items()
    ]


def choose_float_layers(
    gm: GraphModule,
    ctx: CompileContext,
    *,
    data: Iterable[Any] | None,
    options: PrecisionOptions,
    config: QuantConfig,
) -> PassResult:
    """Choose the layers to keep in float (module docstring)."""
    options.check()
    data = data if data is not None else ctx.config.calibration_data
    if data is None:
        raise InputError("mixed precision needs the calibration data to measure on")
    data = list(data)
    batches = input_batches(gm, data)
    expected = flat_outputs(gm, batches)
    float_accuracy = options.eval_fn(gm) if options.eval_fn is not None else math.nan

    def figure(skip: tuple[str, ...]) -> float:
        trial = replace(config, skip=(*config.skip, *skip))
        reference = quantize_copy(gm, trial, data, ctx.config.example_inputs)
        if options.eval_fn is not None:
            return options.eval_fn(reference)
        return sqnr(expected, flat_outputs(reference, batches))

    def met(value: float) -> bool:
        if options.target_sqnr is not None:
            return value >= options.target_sqnr
        return value >= float_accuracy - options.max_accuracy_drop

    analysis = measure_layers(
        gm, ctx.config.example_inputs, data, config, statistics=False, ops=True
    )
    ranking = [layer.name for layer in analysis.layers]
    macs = _macs(gm)
    total_macs = sum(macs.values()) or 1
    layers = {name: weighted_layer(module) for name, module in gm.named_modules()}
    weights = {name: layer.weight.numel() for name, layer in layers.items() if layer is not None}
    chosen: list[str] = []
    rows = []
    # the analysis already quantized everything; only eval_fn needs its own first figure
    value = figure(()) if options.eval_fn is not None else analysis.model_sqnr
    while True:
        extra = sum(weights.get(n, 0) for n in chosen)
        rows.append(
            {
                "float layers and ops": ", ".join(chosen) or "-",
                "sqnr_db" if options.eval_fn is None else "accuracy": f"{value:.2f}",
                "extra_weight_bytes": 3 * extra,
                "float_macs_share": f"{sum(macs.get(n, 0) for n in chosen) / total_macs:.1%}",
            }
        )
        if met(value) or len(chosen) >= len(ranking) - 1:  # with none left, nothing is INT8
            break
        chosen.append(ranking[len(chosen)])
        value = figure(tuple(chosen))
    ctx.state.report.tables["mixed_precision"] = rows
    if not met(value):
        raise InputError(
            f"mixed precision: the target is not met even with all but one of the "
            f"{len(ranking)} quantized layers and ops in float (reached {value:.2f})",
            hint="lower the target, or check the data and eval_fn",
        )
    if options.latency_rounds:
        ctx.state.report.tables["mixed_precision_latency"] = _latency_rows(
            gm, ctx, data, chosen, options.latency_rounds, config
        )
    FLOAT_LAYERS.set(gm, tuple(chosen))
    return PassResult(gm, modified=False)


def choose_precision(
    data: Iterable[Any] | None, options: PrecisionOptions, config: QuantConfig
) -> Pass:
    """The mixed-precision step of ``quantize(..., target_sqnr=...)``.

    Example::

        quantize(batches, target_sqnr=30.0)   # includes choose_precision
    """
    options.check()
    if options.latency_rounds and not config.target.kernels:
        raise InputError(
            f"latency_rounds times the INT8 kernels; engine {config.engine!r} has none here",
            hint="time the exported ONNX file in its runtime instead (fxcomp.runtime.latency)",
        )

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return choose_float_layers(gm, ctx, data=data, options=options, config=config)

    return Pass("choose_precision", run, options=options)
