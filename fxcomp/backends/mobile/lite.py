"""The PyTorch lite interpreter: load a ``.ptl`` program, its weights packed for an engine.

Example::

    module, bytecode = load_program(Path("model.ptl").read_bytes(), "qnnpack")
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fxcomp.ir.errors import BackendError
from fxcomp.quant.scheme import deprecated_apis, packing_engine

__all__ = ["load_program", "open_program"]


def load_program(program: bytes, engine: str | None) -> tuple[Any, int]:
    """A ``.ptl`` program's lite-interpreter module, its weights packed for ``engine`` (the
    current engine for a float program), and its bytecode version.

    Example::

        module, bytecode = load_program(Path("model.ptl").read_bytes(), "qnnpack")
    """
    from torch.jit.mobile import _get_model_bytecode_version, _load_for_lite_interpreter

    with deprecated_apis(), packing_engine(engine or torch.backends.quantized.engine):
        bytecode = _get_model_bytecode_version(io.BytesIO(program))
        return _load_for_lite_interpreter(io.BytesIO(program)), bytecode


def open_program(members: Mapping[str, bytes], manifest: dict[str, Any], path: Path) -> Any:
    """A bundle's lite-interpreter module (its one member, ``model.ptl``); ``BackendError``
    when this torch cannot load it or its bytecode version is not the manifest's."""
    made_with = manifest.get("versions", {}).get("torch")
    (program,) = members.values()
    try:
        module, bytecode = load_program(program, manifest.get("engine"))
    except Exception as err:
        raise BackendError(
            f"the lite interpreter of torch {torch.__version__} cannot load {path}'s model "
            f"(made with torch {made_with}, bytecode version "
            f"{manifest.get('bytecode_version')}): {err}"
        ) from err
    if bytecode != manifest.get("bytecode_version"):
        raise BackendError(
            f"{path}: the model is bytecode version {bytecode}, the manifest says "
            f"{manifest.get('bytecode_version')}"
        )
    return module
