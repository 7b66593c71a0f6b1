"""What a compile did, pass by pass: a readable table, and a dict for JSON.

Example::

    result = fxcomp.compile(model, x, passes=[fxcomp.passes.fuse()])
    table = str(result.report)                # the table
    json.dumps(result.report.to_dict())       # the same data
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate

__all__ = ["Note", "PassRecord", "Report", "describe_options"]

_LISTED = 8  # items of a sequence of plain values listed one by one in a record's options


def _key(key: Any) -> str:
    """A mapping key as a JSON key: a function or class by its name."""
    return key if isinstance(key, str) else getattr(key, "__name__", None) or str(key)


def _plain(value: Any) -> bool:
    """A value a record lists as it is: not data (tensors, batches, data sets)."""
    return value is None or isinstance(value, bool | int | float | str | type) or callable(value)


def describe_options(options: Any) -> Any:
    """A pass's options as JSON-ready data: dataclasses and mappings field by field,
    numbers and strings as they are, tensors by shape, data sets by their size, functions
    and classes by name.

    Example::

        describe_options(PruneOptions(0.3))["ratio"]   # 0.3
    """
    if options is None or isinstance(options, bool | int | str):
        return options
    if isinstance(options, float):
        return options if math.isfinite(options) else str(options)
    if isinstance(options, enum.Enum):
        return options.name
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        fields = dataclasses.fields(options)
        return {f.name: describe_options(getattr(options, f.name)) for f in fields if f.repr}
    if isinstance(options, Mapping):
        return {_key(key): describe_options(value) for key, value in options.items()}
    if isinstance(options, torch.Tensor):
        return f"tensor{list(options.shape)}"
    if isinstance(options, torch.dtype):
        return str(options).removeprefix("torch.")
    if isinstance(options, torch.nn.Module):
        return f"<{type(options).__name__}>"
    if isinstance(options, type | Callable):
        return getattr(options, "__name__", None) or f"<{type(options).__name__}>"
    if isinstance(options, tuple | list) and len(options) <= _LISTED and all(map(_plain, options)):
        return [describe_options(item) for item in options]
    size = len(options) if hasattr(options, "__len__") else None
    return f"<{type(options).__name__}" + (f" of {size}>" if size is not None else ">")


@dataclass(frozen=True)
class Note:
    """Why a rewrite rule did not apply at a node."""

    pass_name: str
    node: str
    rule: str
    reason: str
    source: str | None = None

    def __str__(self) -> str:
        where = f" [{self.source}]" if self.source else ""
        return f"{self.pass_name}: {self.rule} not applied at '{self.node}': {self.reason}{where}"


@dataclass
class PassRecord:
    """One pass run: time, node counts by op, parameters and bytes before and after.

    ``path`` is the qualified name ("quantize/calibrate" for a pass inside a pipeline).
    """

    name: str
    path: str
    modified: bool
    seconds: float
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int
    options: Any = None  # the pass's options, as ``describe_options`` gives them
    children: list[PassRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, children included."""
        data = asdict(self)
        data["children"] = [child.to_dict() for child in self.children]
        return data


@dataclass
class Report:
    """The records of every pass (in order, pipelines nested) and the notes they left.

    ``tables`` holds per-layer rows a pass recorded (``"prune"``: channels before and after
    per layer); ``figures`` maps a figure's name to the PNG file a pass wrote for it.
    """

    records: list[PassRecord] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)

    def find(self, name: str) -> PassRecord | None:
        """The first record (depth first) of the pass called ``name``."""
        stack = list(reversed(self.records))
        while stack:
            record = stack.pop()
            if record.name == name:
                return record
            stack.extend(reversed(record.children))
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole report."""
        return {
            "passes": [record.to_dict() for record in self.records],
            "notes": [asdict(note) for note in self.notes],
            "artifacts": self.artifacts,
            "tables": self.tables,
            "figures": self.figures,
        }

    def table(self, name: str) -> str:
        """The per-layer table a pass recorded under ``name`` (e.g. "prune"), as text."""
        return tabulate(self.tables[name], headers="keys", disable_numparse=True)

    def __str__(self) -> str:
        rows = []

        def add(record: PassRecord, depth: int) -> None:
            before, after = sum(record.nodes_before.values()), sum(record.nodes_after.values())
            rows.append(
                [
                    "  " * depth + record.name,
                    "yes" if record.modified else "no",
                    f"{record.seconds * 1e3:.1f}",
                    f"{before} -> {after}",
                    f"{record.parameters_before:,} -> {record.parameters_after:,}",
                    f"{record.bytes_before / 2**20:.2f} -> {record.bytes_after / 2**20:.2f}",
                    sum(1 for note in self.notes if note.pass_name == record.path),
                ]
            )
            for child in record.children:
                add(child, depth + 1)

        for record in self.records:
            add(record, 0)
        headers = ["pass", "modified", "ms", "nodes", "parameters", "MiB", "notes"]
        text = tabulate(rows, headers=headers, disable_numparse=True)
        for artifact in self.artifacts:
            figures = ", ".join(f"{k} {v:.4g}" for k, v in artifact["parity"].items())
            size = artifact["bytes"] / 2**20 if artifact["bytes"] else 0.0
            text += f"\n{artifact['backend']}: {artifact['path']} ({size:.2f} MiB) {figures}"
            for note in artifact["manifest"].get("notes", ()):
                text += f"\n  note: {note}"
        return text
