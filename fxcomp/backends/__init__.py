"""Backends: each turns a compiled graph into a deployable artifact and loads it back.

``BACKENDS`` holds one of each (``Backend``: check options and target, emit, load, runner).
``check_request`` is the check ``compile`` and the CLI both make before any pass runs: the
backend exists, takes these options, and takes the quantization config the passes declare.

Example::

    from fxcomp.backends import BACKENDS, check_request
    backend = check_request("onnx", passes, {"opset": 17})
    artifact = backend.emit(gm, ctx, Path("out"))
"""

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from fxcomp.backends.base import Artifact, Backend
from fxcomp.backends.executorch.backend import ExecuTorchBackend
from fxcomp.backends.mobile.backend import MobileBackend
from fxcomp.backends.onnx.backend import OnnxBackend
from fxcomp.backends.openvino.backend import OpenVinoBackend
from fxcomp.backends.torchscript import TorchScriptBackend
from fxcomp.ir.errors import BackendError
from fxcomp.quant.config import declared_config, nested_passes

__all__ = ["BACKENDS", "Artifact", "Backend", "check_request", "get_backend"]

BACKENDS: Mapping[str, Backend] = MappingProxyType(
    {
        b.name: b
        for b in (
            TorchScriptBackend(),
            OnnxBackend(),
            MobileBackend(),
            ExecuTorchBackend(),
            OpenVinoBackend(),
        )
    }
)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``BackendError`` listing the others when there is none.

    Example::

        get_backend("onnx").load("out/model.onnx")
    """
    if name not in BACKENDS:
        raise BackendError(
            f"no backend named {name!r}",
            hint=f"available: {', '.join(BACKENDS)}; leave backend=None for the GraphModule",
        )
    return BACKENDS[name]


def check_request(
    name: str, passes: Iterable[Any], options: Mapping[str, Any] | None = None
) -> Backend:
    """The backend ``name``, once it has accepted ``options`` and the quantization config
    ``passes`` declare (``fxcomp.quant.config.declared_config``); raise before any work
    otherwise.

    Example::

        check_request("mobile", [fuse(), quantize(data, engine="x86")])   # BackendError
    """
    backend = get_backend(name)
    backend.check_options(**dict(options or {}))
    passes = list(passes)
    backend.check_target(declared_config(passes))
    backend.check_passes(nested_passes(passes))
    return backend
