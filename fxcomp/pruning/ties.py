"""What the channel rules write to: each value's channel ``Span`` and the ties between channels.

``ChannelTies`` holds, for a graph being analysed, the span of every value's channels, the
edges that tie one channel of one value to one of another, the ``split`` pieces, and the
reasons that block values from pruning. A channel rule (``fxcomp.pruning.rules``) reads
spans and shapes and writes ties with ``claim``, ``link``, ``same``, ``tie`` and ``block``.

Example::

    def my_elementwise(graph: ChannelTies, node: Node) -> str | None:
        x = node.args[0]
        if graph.span(x) is None:
            return None              # nothing with channels comes in
        graph.claim(node, graph.span(x))
        graph.same(x, node)          # channel k in is channel k out
        return None                  # or the reason to block
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.ir.graph import module_of, source_of, target_name

__all__ = ["ChannelTies", "Group", "Span", "Split", "arg_of", "calls", "shape_of"]


@dataclass(frozen=True)
class Span:
    """Where a value's channels lie: the axes from ``axis`` with extents ``dims``.

    The channel index is flat over those axes. ``unit`` is the position in ``dims`` of the
    axis that pruning shortens (the others stay whole).
    """

    axis: int
    dims: tuple[int, ...]
    unit: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def axes(self) -> range:
        return range(self.axis, self.axis + len(self.dims))

    def shrunk(self, kept: int) -> tuple[int, ...]:
        """The extents of the span's axes once only ``kept`` channels remain."""
        others = self.size // self.dims[self.unit]
        return tuple(kept // others if i == self.unit else d for i, d in enumerate(self.dims))


@dataclass
class Group:
    """Values whose channels are tied, their channel sets, and what blocks pruning them.

    ``members[value][c]`` is the channel set that channel ``c`` of ``value`` belongs to,
    numbered 0 to ``sets - 1``.
    """

    values: list[str]
    members: dict[str, torch.Tensor]
    sets: int
    blocked_by: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """Whether channel sets of this group may be removed."""
        return not self.blocked_by and self.sets > 1

    @property
    def channel_sets(self) -> list[frozenset[tuple[str, int]]]:
        """Every channel set as the ``(value, channel)`` pairs it holds."""
        found: list[set[tuple[str, int]]] = [set() for _ in range(self.sets)]
        for value, labels in self.members.items():
            for c, label in enumerate(labels.tolist()):
                found[label].add((value, c))
        return [frozenset(s) for s in found]


@dataclass(frozen=True)
class Split:
    """A ``split``/``chunk`` of ``source`` along ``dim`` into pieces of ``sizes``."""

    source: Node
    dim: int
    sizes: tuple[int, ...]


def shape_of(node: object) -> tuple[int, ...] | None:
    """The shape recorded on a node's value, or None (not a node, or not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def arg_of(node: Node, index: int, name: str, default: object = None) -> object:
    """A call's argument, given by position ``index`` or keyword ``name``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def calls(node: Node, functions: set | dict, methods: set | tuple = ()) -> bool:
    """Whether ``node`` calls one of ``functions`` or one of the methods named."""
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


class ChannelTies:
    """Spans, ties, splits and blocking reasons of one graph's values (module docstring)."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.edges: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
        self.spans: dict[str, Span] = {}
        self.splits: dict[str, Split] = {}
        self.blocked: dict[str, list[str]] = {}  # value -> reasons

    def span(self, value: object) -> Span | None:
        """Where ``value``'s channels lie, if it has any yet."""
        return self.spans.get(value.name) if isinstance(value, Node) else None

    def module(self, node: Node) -> nn.Module | None:
        """The module a ``call_module`` node runs."""
        return module_of(self.gm, node)

    def describe(self, node: Node) -> str:
        """The node's op and what it calls, for a blocking reason."""
        return f"{node.op} {target_name(self.gm, node)}"

    def claim(self, node: Node, span: Span) -> bool:
        """Give ``node``'s value ``span``; False when it already has a different one."""
        have = self.spans.get(node.name)
        if have is None:
            self.spans[node.name] = span
            return True
        return (have.axis, have.dims) == (span.axis, span.dims)

    def link(self, a: Node, b: Node, channels_a: torch.Tensor, channels_b: torch.Tensor) -> None:
        """Tie channel ``channels_a[i]`` of ``a`` to channel ``channels_b[i]`` of ``b``."""
        self.edges.append((a.name, b.name, channels_a, channels_b))

    def same(self, a: Node, b: Node) -> None:
        """Tie every channel of ``a`` to the same channel of ``b``."""
        channels = torch.arange(self.spans[a.name].size)
        self.link(a, b, channels, channels)

    def tie(self, node: Node, index: torch.Tensor) -> None:
        """Tie the channels in each column of ``index`` (rows: the copies to keep alike)."""
        self.link(node, node, index[:1].expand_as(index).reshape(-1), index.reshape(-1))

    def block(self, node: Node, values: list[Node], reason: str) -> None:
        """Keep every channel of ``values`` (and their groups) because of ``node``."""
        where = source_of(node)
        text = f"'{node.name}': {reason}" + (f" [{where}]" if where else "")
        for value in values:
            split = self.splits.get(value.name)
            self.blocked.setdefault((split.source if split else value).name, []).append(text)
