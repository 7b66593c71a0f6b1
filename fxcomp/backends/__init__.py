"""Backends: each turns a compiled graph into a deployable artifact and loads it back.

Example::

    from fxcomp.backends import BACKENDS
    artifact = BACKENDS["torchscript"].emit(gm, ctx, Path("out"))
"""

from types import MappingProxyType

from fxcomp.backends import mobile, onnx_model, torchscript
from fxcomp.backends.artifact import Artifact

__all__ = ["BACKENDS", "Artifact"]

BACKENDS = MappingProxyType({"torchscript": torchscript, "onnx": onnx_model, "mobile": mobile})
