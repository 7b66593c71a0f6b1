"""fxcomp: a graph-rewriting model-compression compiler for PyTorch, built on torch.fx.

The package is layered (lowest first): ``fxcomp.ir`` (graphs, capture, errors) <-
``fxcomp.pipeline`` (pass manager, config and state, report) and ``fxcomp.runtime``
(training, latency, parity) <- ``fxcomp.nn`` (the modules passes create) <-
``fxcomp.quant`` and ``fxcomp.pruning`` (the machinery) <- ``fxcomp.passes`` <-
``fxcomp.backends`` <- ``fxcomp.reporting`` <- ``fxcomp.api`` <- ``fxcomp.cli``. The names
below are imported on first use, so ``import fxcomp.quant`` loads only what it needs.

Example::

    import fxcomp, torch, torchvision
    result = fxcomp.compile(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
                            passes=[fxcomp.passes.fuse()])
    table = str(result.report)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and editors
    from fxcomp import passes as passes
    from fxcomp.api.analyze import analyze as analyze
    from fxcomp.api.compile import CompileResult as CompileResult
    from fxcomp.api.compile import compile as compile
    from fxcomp.api.transplant import transplant as transplant
    from fxcomp.backends.bundle import Bundle as Bundle
    from fxcomp.backends.bundle import load_bundle as load_bundle
    from fxcomp.ir.capture import trace as trace
    from fxcomp.ir.errors import BackendError as BackendError
    from fxcomp.ir.errors import FxcompError as FxcompError
    from fxcomp.ir.errors import InputError as InputError
    from fxcomp.ir.errors import PassError as PassError
    from fxcomp.ir.errors import PassOrderError as PassOrderError
    from fxcomp.ir.errors import TraceError as TraceError
    from fxcomp.ir.errors import UnsupportedGraphError as UnsupportedGraphError
    from fxcomp.ir.errors import VerificationError as VerificationError
    from fxcomp.ir.serialize import load as load
    from fxcomp.ir.serialize import save as save
    from fxcomp.pipeline.context import CompileConfig as CompileConfig
    from fxcomp.pipeline.context import CompileContext as CompileContext
    from fxcomp.pipeline.pass_manager import Pass as Pass
    from fxcomp.pipeline.pass_manager import PassManager as PassManager
    from fxcomp.pipeline.pass_manager import PassResult as PassResult
    from fxcomp.pipeline.pass_manager import Pipeline as Pipeline
    from fxcomp.pipeline.report import Report as Report
    from fxcomp.quant.config import QuantConfig as QuantConfig
    from fxcomp.quant.sensitivity import Analysis as Analysis
    from fxcomp.reporting.dump import DumpAfterEach as DumpAfterEach
    from fxcomp.reporting.dump import render_graph as render_graph

_HOMES = {
    "Analysis": "fxcomp.quant.sensitivity",
    "BackendError": "fxcomp.ir.errors",
    "Bundle": "fxcomp.backends.bundle",
    "CompileConfig": "fxcomp.pipeline.context",
    "CompileContext": "fxcomp.pipeline.context",
    "CompileResult": "fxcomp.api.compile",
    "DumpAfterEach": "fxcomp.reporting.dump",
    "FxcompError": "fxcomp.ir.errors",
    "InputError": "fxcomp.ir.errors",
    "Pass": "fxcomp.pipeline.pass_manager",
    "PassError": "fxcomp.ir.errors",
    "PassManager": "fxcomp.pipeline.pass_manager",
    "PassOrderError": "fxcomp.ir.errors",
    "PassResult": "fxcomp.pipeline.pass_manager",
    "Pipeline": "fxcomp.pipeline.pass_manager",
    "QuantConfig": "fxcomp.quant.config",
    "Report": "fxcomp.pipeline.report",
    "TraceError": "fxcomp.ir.errors",
    "UnsupportedGraphError": "fxcomp.ir.errors",
    "VerificationError": "fxcomp.ir.errors",
    "analyze": "fxcomp.api.analyze",
    "compile": "fxcomp.api.compile",
    "load": "fxcomp.ir.serialize",
    "load_bundle": "fxcomp.backends.bundle",
    "render_graph": "fxcomp.reporting.dump",
    "save": "fxcomp.ir.serialize",
    "trace": "fxcomp.ir.capture",
    "transplant": "fxcomp.api.transplant",
}

__all__ = sorted([*_HOMES, "passes"])


def __getattr__(name: str) -> Any:
    """Import a public name (or ``fxcomp.passes``) the first time it is asked for."""
    if name == "passes":
        return importlib.import_module("fxcomp.passes")
    if name not in _HOMES:
        raise AttributeError(f"module 'fxcomp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
