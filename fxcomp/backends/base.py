"""The backend contract, and what a backend produces.

A ``Backend`` checks its options and whether it takes a graph's quantization config (both
before any pass runs), emits an ``Artifact`` (written beside its final name, loaded back,
verified against the reference outputs, then renamed into place), loads one back, and
gives a runner that times it next to the float model.

Example::

    backend = BACKENDS["onnx"]
    backend.check_target(QuantConfig("tensorrt"))
    artifact = backend.emit(gm, ctx, Path("out"))
    run = backend.runner(artifact)
    artifact.path, artifact.manifest["engine"], artifact.parity["sqnr_db_vs_float"]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from fxcomp.ir.errors import BackendError, InputError
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.scheme import ENGINES

__all__ = ["Artifact", "Backend", "artifact_path", "expected_outputs"]


@dataclass
class Artifact:
    """A backend's output file with its manifest and parity figures."""

    backend: str
    path: Path
    manifest: dict[str, Any]
    parity: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "backend": self.backend,
            "path": str(self.path),
            "bytes": self.path.stat().st_size if self.path.exists() else None,
            "manifest": self.manifest,
            "parity": self.parity,
        }


class Backend(ABC):
    """What every backend implements (``fxcomp.backends.BACKENDS`` holds one of each).

    Example::

        BACKENDS["torchscript"].check_options()            # takes none
        BACKENDS["mobile"].check_target(QuantConfig("x86"))  # BackendError: qnnpack only
    """

    name: ClassVar[str]

    def check_options(self, **options: Any) -> None:
        """Raise ``InputError`` for options this backend cannot honour (by default it takes
        none)."""
        if options:
            raise InputError(f"the {self.name} backend takes no options, got {sorted(options)}")

    def check_target(self, config: QuantConfig | None) -> None:
        """Raise ``BackendError`` unless this backend takes graphs quantized for ``config``
        (a float graph, ``None``, goes to every backend): the engine lists its backends."""
        if config is None or self.name in config.target.backends:
            return
        engines = [name for name, engine in ENGINES.items() if self.name in engine.backends]
        raise BackendError(
            f"the {self.name} backend does not take graphs quantized for '{config.engine}' "
            f"(its graphs go to {' or '.join(config.target.backends)})",
            hint=f"quantize with engine {' / '.join(engines)} for the {self.name} backend, "
            f"or use backend={config.target.backends[0]!r}",
        )

    def check_passes(self, passes: Sequence[Any]) -> None:
        """Raise ``BackendError`` for a pass whose output this backend cannot take, before
        any work (``passes``: every pass, those inside a ``Pipeline`` too); every backend
        takes every pass unless it says otherwise."""
        return None

    @abstractmethod
    def emit(self, gm: GraphModule, ctx: CompileContext, out_dir: Path, **options: Any) -> Artifact:
        """Write, load back and verify ``gm`` in ``out_dir``; the artifact."""

    @abstractmethod
    def load(self, artifact: Artifact | Path | str) -> Any:
        """What ``emit`` wrote, loaded back for running."""

    def runner(self, artifact: Artifact | Path | str) -> Callable[..., Any]:
        """A callable taking torch tensors that runs the artifact (for timing)."""
        return self.load(artifact)


def artifact_path(artifact: Artifact | Path | str) -> Path:
    """The file of an artifact given as an ``Artifact`` or a path."""
    return artifact.path if isinstance(artifact, Artifact) else Path(artifact)


def expected_outputs(gm: GraphModule, reference_outputs: Any, example_inputs: tuple) -> Any:
    """What a backend's file must reproduce: the reference graph's outputs when the graph is
    quantized, else the compiled graph's own (a pruned graph differs from the traced model).
    """
    if reference_outputs is not None:
        return reference_outputs
    with torch.no_grad():
        return gm(*example_inputs)
