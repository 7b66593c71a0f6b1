"""``fxcomp.compile``: trace a copy of the model, run the passes, write what was asked for.

Example::

    result = fxcomp.compile(model, torch.randn(1, 3, 224, 224), passes=[fxcomp.passes.fuse()])
    result.module(x)          # the compiled GraphModule
    table = str(result.report)   # per-pass table
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.atomic import write_atomic
from fxcomp.backends import BACKENDS
from fxcomp.context import AfterPassHook, BeforePassHook, CompileContext
from fxcomp.distributed import is_main_process
from fxcomp.errors import BackendError, InputError
from fxcomp.figures import png_bytes
from fxcomp.graph import node_counts, state_size
from fxcomp.html_report import artifact_figure, render_html
from fxcomp.latency import artifact_runner, median_latency
from fxcomp.module_copy import copy_module
from fxcomp.pass_manager import PassManager
from fxcomp.report import PassRecord, Report
from fxcomp.trace import LeafSpec, as_input_tuple, trace

__all__ = ["CompileResult", "compile"]


@dataclass
class CompileResult:
    """The compiled module, the backend artifact (None without a backend) and the report."""

    module: GraphModule
    artifact: Any | None
    report: Report


def compile(
    model: nn.Module,
    example_inputs: Any,
    passes: Sequence[Any] = (),
    backend: str | None = None,
    output_dir: str | Path | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
    calibration_data: Iterable[Any] | None = None,
    engine: str | None = None,
    before_pass: Sequence[BeforePassHook] = (),
    after_pass: Sequence[AfterPassHook] = (),
    backend_options: Mapping[str, Any] | None = None,
    analyze: bool = False,
    latency_rounds: int = 0,
) -> CompileResult:
    """Trace a deep copy of ``model``, run ``passes`` in order, and report each step.

    The caller's model is never changed. With ``output_dir``, ``report.json`` is written
    there atomically once every pass has succeeded. Under ``torchrun`` every rank runs the
    passes (training passes share the work) and rank 0 alone emits and writes; the other
    ranks return the compiled module with ``artifact=None``. With ``output_dir`` a
    ``report.html`` (tables and the figures embedded; it opens from disk) is written too.
    ``analyze`` adds the per-layer quantization analysis (``fxcomp.analyze`` on
    ``calibration_data``, for ``engine``) to the report: ``tables["analysis"]`` and the
    ``layer_sqnr`` and ``weight_histograms`` figures. ``latency_rounds`` times the artifact
    against the float model, interleaved, and records the medians in the report.
    ``backend_options`` go to the backend (``onnx``: ``opset``, ``dynamic_batch``,
    ``fp16_weights``).

    Example::

        result = fxcomp.compile(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
                                passes=[fxcomp.passes.fuse()])
    """
    if backend is not None and backend not in BACKENDS:
        raise BackendError(
            f"no backend named {backend!r}",
            hint=f"available: {', '.join(BACKENDS)}; leave backend=None for the GraphModule",
        )
    if backend is not None and output_dir is None:
        raise InputError(f"backend {backend!r} writes files: give output_dir")
    if backend_options and backend is None:
        raise InputError("backend_options given without a backend")
    if analyze and calibration_data is None:
        raise InputError(
            "analyze needs calibration_data", hint="compile(..., calibration_data=batches)"
        )
    if backend is not None:
        BACKENDS[backend].check_options(**(backend_options or {}))
    manager = PassManager(passes)
    ctx = CompileContext(
        example_inputs=as_input_tuple(example_inputs),
        calibration_data=calibration_data,
        backend=backend,
        engine=engine,
        before_pass=list(before_pass),
        after_pass=list(after_pass),
    )
    start = time.perf_counter()
    gm = trace(model, ctx.example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    params_before, bytes_before = state_size(model)
    params_after, bytes_after = state_size(gm)
    traced = PassRecord(
        name="trace",
        path="trace",
        modified=True,
        seconds=time.perf_counter() - start,
        nodes_before={},
        nodes_after=node_counts(gm),
        parameters_before=params_before,
        parameters_after=params_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
    )
    ctx.history.append("trace")
    floating = copy_module(gm) if latency_rounds else None
    if backend is not None:  # the reference the backend verifies its artifact against
        with torch.no_grad():
            ctx.float_outputs = gm(*ctx.example_inputs)
    for hook in ctx.after_pass:
        hook(traced, gm, ctx)
    result, records = manager.run(gm, ctx)
    ctx.report.records = [traced, *records]
    artifact = None
    if not is_main_process():  # under torchrun, rank 0 alone writes files
        return CompileResult(result.graph_module, None, ctx.report)
    if backend is not None:
        options = dict(backend_options or {})
        artifact = BACKENDS[backend].emit(result.graph_module, ctx, Path(output_dir), **options)
        summary = artifact.to_dict()
        if floating is not None:
            models = {"float": floating, backend: artifact_runner(backend, artifact.path)}
            ms = median_latency(models, [ctx.example_inputs], latency_rounds)
            summary["latency_ms"] = {name: values[0] for name, values in ms.items()}
        ctx.report.artifacts.append(summary)
        ctx.figures["size_latency"] = lambda: artifact_figure(ctx.report)
    if analyze:
        _add_analysis(ctx, model, calibration_data, engine or "x86", leaf_modules)
    if output_dir is not None:
        pictures = {}
        for name, draw in ctx.figures.items():
            path = Path(output_dir) / f"{name}.png"
            pictures[name] = png_bytes(draw)
            write_atomic(path, pictures[name])
            ctx.report.figures[name] = str(path)
        write_atomic(Path(output_dir) / "report.json", json.dumps(ctx.report.to_dict(), indent=2))
        write_atomic(Path(output_dir) / "report.html", render_html(ctx.report, pictures))
    return CompileResult(result.graph_module, artifact, ctx.report)


def _add_analysis(
    ctx: CompileContext,
    model: nn.Module,
    data: Iterable[Any],
    engine: str,
    leaf_modules: Iterable[LeafSpec],
) -> None:
    """The per-layer analysis as a report table and two figures."""
    from fxcomp.analysis import analyze  # it compiles, so it imports this module

    analysis = analyze(model, ctx.example_inputs, data, engine=engine, leaf_modules=leaf_modules)
    ctx.report.tables["analysis"] = [
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
    ctx.figures["layer_sqnr"] = analysis.figure
    ctx.figures["weight_histograms"] = analysis.histogram_figure
