"""fxcomp: a graph-rewriting model-compression compiler for PyTorch, built on torch.fx.

Example::

    import fxcomp, torch, torchvision
    result = fxcomp.compile(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
                            passes=[fxcomp.passes.fuse()])
    table = str(result.report)
"""

from fxcomp import passes
from fxcomp.analysis import Analysis, analyze
from fxcomp.bundle import Bundle, load_bundle
from fxcomp.compiler import CompileResult, compile
from fxcomp.context import CompileContext
from fxcomp.dump import DumpAfterEach, render_graph
from fxcomp.errors import (
    BackendError,
    FxcompError,
    InputError,
    PassError,
    PassOrderError,
    TraceError,
    UnsupportedGraphError,
    VerificationError,
)
from fxcomp.pass_manager import Pass, PassManager, PassResult, Pipeline
from fxcomp.report import Report
from fxcomp.serialize import load, save
from fxcomp.trace import trace

__all__ = [
    "Analysis",
    "BackendError",
    "Bundle",
    "CompileContext",
    "CompileResult",
    "DumpAfterEach",
    "FxcompError",
    "InputError",
    "Pass",
    "PassError",
    "PassManager",
    "PassOrderError",
    "PassResult",
    "Pipeline",
    "Report",
    "TraceError",
    "UnsupportedGraphError",
    "VerificationError",
    "analyze",
    "compile",
    "load",
    "load_bundle",
    "passes",
    "render_graph",
    "save",
    "trace",
]
