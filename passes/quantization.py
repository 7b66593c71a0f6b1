"""Post-training static quantization: ``quantize = insert_observers, calibrate, freeze, lower``.

The result is a graph of fbgemm/qnnpack quantized kernels for ``engine`` (``x86``,
``fbgemm``, ``qnnpack``), or, for engines whose runtimes fuse Q/DQ steps themselves
(``tensorrt``, ``ort``; or with ``lower=False``), the reference graph of float ops and Q/DQ
steps that the ONNX backend exports. The options describing the target (engine, observer,
per-channel weights, reduce range, skip) become the graph's one ``QuantConfig``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fxcomp.ir.errors import InputError
from fxcomp.passes.bias_correction import correct_bias
from fxcomp.passes.rounding import learn_rounding
from fxcomp.pipeline.pass_manager import Pipeline
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.mixed_precision import EvalFn, PrecisionOptions, choose_precision
from fxcomp.quant.ops import SkipSpec
from fxcomp.quant.pipeline import calibrate, freeze, observe
from fxcomp.quant.pipeline import lower as lower_step

__all__ = ["ROUNDINGS", "QuantizeOptions", "quantize"]

ROUNDINGS = ("nearest", "learned")


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``quantize`` was asked for: the graph's config and the steps around it."""

    config: QuantConfig
    calibration_data: Iterable[Any] | None
    lower: bool
    bias_correction: bool
    rounding: str
    precision: PrecisionOptions | None
    progress: bool


def quantize(
    calibration_data: Iterable[Any] | None = None,
    *,
    engine: str = "x86",
    observer: str = "mse",
    skip: Sequence[SkipSpec] = (),
    per_channel: bool = True,
    reduce_range: bool | None = None,
    lower: bool | None = None,
    progress: bool = True,
    target_sqnr: float | None = None,
    max_accuracy_drop: float | None = None,
    eval_fn: EvalFn | None = None,
    latency_rounds: int = 0,
    bias_correction: bool = False,
    rounding: str = "nearest",
) -> Pipeline:
    """INT8 post-training static quantization for ``engine``, calibrated on ``calibration_data``
    (by default the ``calibration_data`` given to ``fxcomp.compile``).

    ``observer`` is ``mse`` (the default: L2 range search on a histogram), ``histogram``
    (percentile clipping), ``minmax`` or ``moving_average``; ``skip`` keeps
    layers in float by qualified module name, module type or op name ("add", "cat").
    ``reduce_range`` overrides the engine's 7-bit scale (``scheme_for``): of activations for
    x86/fbgemm/qnnpack, of weights for ort (by default on x86 CPUs without VNNI).
    ``target_sqnr`` (dB of the output against float on the calibration data) or
    ``max_accuracy_drop`` (points of ``eval_fn(model)``) turns on mixed precision: the
    layers that hurt most stay float until the target is met (``choose_precision``);
    ``latency_rounds`` then times float, all-INT8 and the mix as TorchScript.
    ``bias_correction`` subtracts the mean output shift weight rounding causes
    (``correct_bias``). ``rounding="learned"`` learns each weight's rounding, up or down, on
    the calibration data against the float graph's output (``learn_rounding``, AdaRound:
    slower, same grids and kernels). ``lower`` (by default for engines with kernels) lowers
    the reference graph to fbgemm/qnnpack kernels.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.fuse(), fxcomp.passes.quantize(loader)])
    """
    if rounding not in ROUNDINGS:
        raise InputError(
            f"quantize rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}"
        )
    config = QuantConfig(engine, observer, per_channel, reduce_range, tuple(skip))
    lower = config.target.kernels if lower is None else lower
    precision = None
    if target_sqnr is not None or max_accuracy_drop is not None or eval_fn is not None:
        precision = PrecisionOptions(target_sqnr, max_accuracy_drop, eval_fn, latency_rounds)
    options = QuantizeOptions(
        config, calibration_data, lower, bias_correction, rounding, precision, progress
    )
    steps = []
    if precision is not None:
        steps.append(choose_precision(calibration_data, precision, config))
    steps += [observe(config), calibrate(calibration_data, progress=progress)]
    if rounding == "learned":
        steps.append(learn_rounding(calibration_data, progress=progress))
    steps.append(freeze())
    if bias_correction:
        steps.append(correct_bias(calibration_data))
    if lower:
        steps.append(lower_step())
    return Pipeline("quantize", steps, run_after=("fuse",), options=options)
