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
) -> CompileResult:
    """Trace a deep copy of ``model``, run ``passes`` in order, and report each step.

    The caller's model is never changed. With ``output_dir``, ``report.json`` is written
    there atomically once every pass has succeeded. Under ``torchrun`` every rank runs the
    passes (training passes share the work) and rank 0 alone emits and writes; the other
    ranks return the compiled module with ``artifact=None``. ``backend_options`` go to the backend
    (``onnx``: ``opset``, ``dynamic_batch``, ``fp16_weights``).

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
        ctx.report.artifacts.append(artifact.to_dict())
    if output_dir is not None:
        for name, draw in ctx.figures.items():
            path = Path(output_dir) / f"{name}.png"
            write_atomic(path, png_bytes(draw))
            ctx.report.figures[name] = str(path)
        write_atomic(Path(output_dir) / "report.json", json.dumps(ctx.report.to_dict(), indent=2))
    return CompileResult(result.graph_module, artifact, ctx.report)
