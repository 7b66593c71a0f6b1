"""``fxcomp.analyze``: what quantizing each layer of a model costs, and why.

Example::

    analysis = fxcomp.analyze(model, x, calibration_batches, engine="x86")
    text = analysis.table()
    analysis.to_dict()["layers"][0]["name"]   # the layer that hurts most
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from fxcomp.ir.capture import capture as _capture
from fxcomp.ir.trace import LeafSpec
from fxcomp.passes.fusion import fuse
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassManager
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.sensitivity import Analysis, measure_layers

__all__ = ["analyze"]


def analyze(
    model: nn.Module,
    example_inputs: Any,
    calibration_data: Iterable[Any],
    *,
    eval_data: Iterable[Any] | None = None,
    engine: str = "x86",
    observer: str = "mse",
    per_channel: bool = True,
    capture: str = "auto",
    leaf_modules: Iterable[LeafSpec] = (),
) -> Analysis:
    """Fuse a copy of ``model``, then measure what each layer's quantization for ``engine``
    costs, calibrated on ``calibration_data`` and measured on ``eval_data`` (by default the
    same; ``fxcomp.quant.sensitivity``). ``model`` is never changed.

    Example::

        analysis = fxcomp.analyze(model, x, batches, engine="x86")
    """
    return analyze_config(
        model,
        example_inputs,
        calibration_data,
        QuantConfig(engine, observer, per_channel),
        eval_data=eval_data,
        capture=capture,
        leaf_modules=leaf_modules,
    )


def analyze_config(
    model: nn.Module,
    example_inputs: Any,
    calibration_data: Iterable[Any],
    config: QuantConfig,
    *,
    eval_data: Iterable[Any] | None = None,
    capture: str = "auto",
    leaf_modules: Iterable[LeafSpec] = (),
) -> Analysis:
    """``analyze`` for a ``QuantConfig`` (the one a compile's passes declare).

    Example::

        analysis = analyze_config(model, x, batches, QuantConfig("tensorrt"))
    """
    captured = _capture(model, example_inputs, capture=capture, leaf_modules=leaf_modules)
    inputs = captured.inputs
    fused, _ = PassManager([fuse()]).run(captured.module, CompileContext.from_inputs(inputs))
    return measure_layers(fused.graph_module, inputs, calibration_data, config, eval_data=eval_data)
