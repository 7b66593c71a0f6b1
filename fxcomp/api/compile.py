"""``fxcomp.compile``: trace a copy of the model, run the passes, write what was asked for.

The steps, each its own function: check the request (the backend, its options, and whether
it takes the quantization config the passes declare) before any work; trace; run the
passes; emit and verify the artifact (and time it); add the per-layer analysis; write the
report. Each step raises before anything is written.

Example::

    result = fxcomp.compile(model, torch.randn(1, 3, 224, 224), passes=[fxcomp.passes.fuse()])
    result.module(x)          # the compiled GraphModule
    table = str(result.report)   # per-pass table
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.api.analyze import analyze_config
from fxcomp.backends import Artifact, Backend, check_request
from fxcomp.ir.capture import CAPTURE
from fxcomp.ir.capture import capture as _capture
from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import node_counts, state_size
from fxcomp.ir.module_copy import copy_module
from fxcomp.ir.trace import LeafSpec
from fxcomp.pipeline.context import CompileConfig, CompileContext, Hook
from fxcomp.pipeline.pass_manager import PassManager
from fxcomp.pipeline.report import PassRecord, Report
from fxcomp.quant.config import QuantConfig, declared_calibration_data, declared_config
from fxcomp.reporting.files import write_report
from fxcomp.reporting.html import artifact_figure
from fxcomp.runtime.distributed import is_main_process
from fxcomp.runtime.latency import median_latency, timing_method

__all__ = ["CompileResult", "compile"]


@dataclass
class CompileResult:
    """The compiled module, the backend artifact (None without a backend) and the report."""

    module: GraphModule
    artifact: Artifact | None
    report: Report


@torch.inference_mode(False)  # passes track tensor versions; inference tensors have none
def compile(
    model: nn.Module,
    example_inputs: Any,
    passes: Sequence[Any] = (),
    backend: str | None = None,
    output_dir: str | Path | None = None,
    *,
    calibration_data: Iterable[Any] | None = None,
    capture: str = "auto",
    dynamic_shapes: Any = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
    before_pass: Sequence[Hook] = (),
    after_pass: Sequence[Hook] = (),
    backend_options: Mapping[str, Any] | None = None,
    analyze: bool = False,
    latency_rounds: int = 0,
) -> CompileResult:
    """Capture a deep copy of ``model``, run ``passes`` in order, and report each step.

    The caller's model is never changed. It may be called under ``torch.inference_mode()``:
    its own work runs outside it. ``example_inputs`` is a tensor, a tuple, or a dict
    of keyword inputs; ``capture`` is ``"auto"`` (symbolic tracing, or ``torch.export``
    where that fails), ``"symbolic"`` or ``"export"`` (``fxcomp.ir.capture``, which also
    says what ``dynamic_shapes``, ``leaf_modules`` and ``concrete_args`` do); the report's
    trace entry says which capture ran and why. Before any work, the backend is asked whether it
    takes ``backend_options`` and the quantization config the passes declare. With
    ``output_dir``, ``report.json`` and ``report.html`` (tables and figures embedded; it
    opens from disk) are written there atomically once every pass has succeeded. Under
    ``torchrun`` every rank runs the passes (training passes share the work) and rank 0
    alone emits and writes; the other ranks return the compiled module with
    ``artifact=None``. ``analyze`` adds the per-layer quantization analysis (on
    ``calibration_data``, or else the batches the quantizing pass carries, for the passes'
    quantization config) to the report: ``tables["analysis"]`` and the ``layer_sqnr`` and
    ``weight_histograms`` figures.
    ``latency_rounds`` times the artifact against the float model, interleaved, and records
    the medians. ``backend_options`` go to the backend (``onnx``: ``opset``,
    ``dynamic_batch``, ``fp16_weights``; ``mobile``: ``mean``, ``std``, ``labels``;
    ``executorch``: those, ``max_batch`` and ``max_length``).

    Example::

        result = fxcomp.compile(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
                                passes=[fxcomp.passes.fuse()])
    """
    manager = PassManager(passes)
    target = _check_request(manager, backend, output_dir, backend_options)
    if analyze and calibration_data is None:
        calibration_data = declared_calibration_data(manager.passes)
    if analyze and calibration_data is None:
        raise InputError(
            "analyze needs calibration data, and no quantizing pass carries any",
            hint="compile(..., calibration_data=batches) or quantize(batches)",
        )
    start = time.perf_counter()
    captured = _capture(
        model,
        example_inputs,
        capture=capture,
        dynamic_shapes=dynamic_shapes,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
    )
    gm, hooks = captured.module, (tuple(before_pass), tuple(after_pass))
    config = CompileConfig(captured.inputs, calibration_data, backend, *hooks)
    ctx = CompileContext(config)
    _record_capture(model, gm, ctx, time.perf_counter() - start)
    floating = copy_module(gm) if latency_rounds and target is not None else None
    if target is not None:  # the reference the backend verifies its artifact against
        with torch.no_grad():
            ctx.state.float_outputs = gm(*config.example_inputs)
    for hook in config.after_pass:
        hook(ctx.state.report.records[0], gm, ctx)
    result, records = manager.run(gm, ctx)
    ctx.state.report.records.extend(records)
    if not is_main_process():  # under torchrun, rank 0 alone writes files
        return CompileResult(result.graph_module, None, ctx.state.report)
    artifact = None
    if target is not None:
        options = dict(backend_options or {})
        artifact = target.emit(result.graph_module, ctx, Path(output_dir), **options)
        _record_artifact(target, artifact, ctx, floating, latency_rounds)
    if analyze:
        quant = declared_config(manager.passes) or QuantConfig()
        _add_analysis(ctx, model, quant, leaf_modules)
    if output_dir is not None:
        write_report(ctx.state.report, ctx.state.figures, Path(output_dir))
    return CompileResult(result.graph_module, artifact, ctx.state.report)


def _check_request(
    manager: PassManager,
    backend: str | None,
    output_dir: str | Path | None,
    options: Mapping[str, Any] | None,
) -> Backend | None:
    """The backend, once it has accepted the options and the passes' quantization config."""
    if backend is None:
        if options:
            raise InputError("backend_options given without a backend")
        return None
    target = check_request(backend, manager.passes, options)
    if output_dir is None:
        raise InputError(f"backend {backend!r} writes files: give output_dir")
    return target


def _record_capture(model: nn.Module, gm: GraphModule, ctx: CompileContext, seconds: float) -> None:
    """The report's first record: the capture, with which one ran and why as its options."""
    params_before, bytes_before = state_size(model)
    params_after, bytes_after = state_size(gm)
    ctx.state.report.records.append(
        PassRecord(
            name="trace",
            path="trace",
            modified=True,
            seconds=seconds,
            nodes_before={},
            nodes_after=node_counts(gm),
            parameters_before=params_before,
            parameters_after=params_after,
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            options=CAPTURE.get(gm),
        )
    )
    ctx.state.history.append("trace")


def _record_artifact(
    backend: Backend,
    artifact: Artifact,
    ctx: CompileContext,
    floating: GraphModule | None,
    rounds: int,
) -> None:
    """The artifact's summary in the report, timed against the float model when asked."""
    summary = artifact.to_dict()
    if floating is not None:
        models = {"float": floating, backend.name: backend.runner(artifact)}
        ms = median_latency(models, [ctx.config.example_inputs], rounds)
        summary["latency_ms"] = {name: values[0] for name, values in ms.items()}
        summary["latency_timing"] = timing_method(models)
    ctx.state.report.artifacts.append(summary)
    ctx.state.figures["size_latency"] = lambda: artifact_figure(ctx.state.report)


def _add_analysis(
    ctx: CompileContext, model: nn.Module, config: QuantConfig, leaf_modules: Iterable[LeafSpec]
) -> None:
    """The per-layer analysis as a report table and two figures."""
    analysis = analyze_config(
        model,
        ctx.config.example_inputs,
        ctx.config.calibration_data,
        config,
        leaf_modules=leaf_modules,
    )
    ctx.state.report.tables["analysis"] = [
        {
            "layer": layer.name,
            "sqnr_alone_db": f"{layer.sqnr_alone:.2f}",
            "sqnr_all_but_it_db": f"{layer.sqnr_without:.2f}",
            "weight_sqnr_db": f"{layer.weight_sqnr:.2f}",
            "weight_outliers": f"{layer.weight.outliers:.3%}",
            "input_clipped": f"{layer.input.clipped:.3%}",
            "output_outliers": f"{layer.output.outliers:.3%}",
        }
        for layer in analysis.layers
    ]
    ctx.state.figures["layer_sqnr"] = analysis.figure
    ctx.state.figures["weight_histograms"] = analysis.histogram_figure
