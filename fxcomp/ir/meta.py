"""Typed graph slots: the values one pass leaves on a graph for later passes and backends.

A ``GraphSlot`` is declared once, by the module that writes it, with its type and what it
means; it stores its value in ``gm.meta`` under a key of its own and checks the type when
written. A pass that builds a new ``GraphModule`` carries the slots over with
``carry_slots``.

Example::

    KEPT = GraphSlot("fxcomp:kept", dict, "channels kept per value")
    KEPT.set(gm, {"conv1": (1, [0, 2, 3])})
    KEPT.get(gm)["conv1"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch.fx import GraphModule

__all__ = ["MADE_BY", "GraphSlot", "carry_slots"]

T = TypeVar("T")
_PREFIX = "fxcomp:"
# node.meta key: the qualified name of the pass that created the node ("trace" for traced
# ones); the pass manager stamps every node that lacks it, and dumps show it
MADE_BY = "fxcomp_pass"


@dataclass(frozen=True)
class GraphSlot(Generic[T]):
    """A declared value on a graph: ``key`` in ``gm.meta`` (starting ``fxcomp:``), the type
    its values have, and what it means.

    Example::

        FLOAT_LAYERS.set(gm, ("fc",)); FLOAT_LAYERS.get(gm, ())
    """

    key: str
    kind: type | tuple[type, ...]
    doc: str

    def __post_init__(self) -> None:
        if not self.key.startswith(_PREFIX):
            raise ValueError(f"a graph slot's key starts with {_PREFIX!r}, got {self.key!r}")

    def get(self, gm: GraphModule, default: Any = None) -> T | Any:
        """The slot's value on ``gm``, or ``default`` when it has none."""
        return gm.meta.get(self.key, default)

    def set(self, gm: GraphModule, value: T) -> None:
        """Store ``value`` on ``gm``; a value of another type is a ``TypeError``."""
        if not isinstance(value, self.kind):
            raise TypeError(f"graph slot {self.key} holds {self.kind}, not {type(value).__name__}")
        gm.meta[self.key] = value


def carry_slots(source: GraphModule, target: GraphModule) -> None:
    """Copy every graph slot of ``source`` onto ``target`` (a module a pass rebuilt).

    Example::

        lowered = GraphModule(gm, new_graph); carry_slots(gm, lowered)
    """
    for key, value in source.meta.items():
        if key.startswith(_PREFIX):
            target.meta[key] = value
