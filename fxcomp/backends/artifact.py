"""What a backend produced: the file, its manifest and how well it matches its references.

Example::

    artifact.path, artifact.manifest["engine"], artifact.parity["sqnr_db_vs_float"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

__all__ = ["Artifact", "expected_outputs"]


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


def expected_outputs(gm: GraphModule, reference_outputs: Any, example_inputs: tuple) -> Any:
    """What a backend's file must reproduce: the reference graph's outputs when the graph is
    quantized, else the compiled graph's own (a pruned graph differs from the traced model).
    """
    if reference_outputs is not None:
        return reference_outputs
    with torch.no_grad():
        return gm(*example_inputs)
