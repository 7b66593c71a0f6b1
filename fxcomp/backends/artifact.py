"""What a backend produced: the file, its manifest and how well it matches its references.

Example::

    artifact.path, artifact.manifest["engine"], artifact.parity["sqnr_db_vs_float"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Artifact"]


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
