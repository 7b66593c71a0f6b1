"""The channel dependency graph: which channels of which values must be pruned together.

A vertex is one channel of one value: ``(node name, index)``, the channel axis being 1 for
convolution-style tensors (N, C, ...) and the feature axis of a Linear's input and output.
An edge joins two channels that an op ties together: a BatchNorm's input and output
channel, the same channel of both inputs and the output of an element-wise op, a depthwise
convolution's input and output, a ``cat`` input channel and its offset in the output, a
channel before ``flatten`` and its block of H*W features after it. A connected component
is a *channel set*: removing it means removing every one of its channels. Values whose
channels are linked form a *group* (one per connected set of values).

Convolution and Linear outputs start new channels (their weights' rows); their inputs are
consumed through weight columns. Any op that touches a value's channels and is not known
here blocks every group it touches: never guessed element-wise. So do the model's inputs
and outputs.

Example::

    graph = ChannelGraph.build(gm)
    for group in graph.groups():
        summary = (group.values, len(group.channel_sets), group.blocked_by)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torchvision.ops import stochastic_depth

from fxcomp.fused import add_relu, weighted_layer
from fxcomp.graph import (
    BATCHNORMS,
    CONVS,
    ELEMENTWISE_MODULES,
    module_of,
    source_of,
    target_name,
)

__all__ = ["ChannelGraph", "Group"]

# Channel k in is channel k out: element-wise modules, and pooling over space.
_ELEMENTWISE_MODULES = (
    *ELEMENTWISE_MODULES,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu6,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.silu,
    F.gelu,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    stochastic_depth,  # torchvision's: drops whole samples, channel k in is channel k out
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clamp"}
_BINARY = {operator.add, torch.add, operator.mul, torch.mul, operator.sub, torch.sub, add_relu}
_BINARY_METHODS = {"add", "mul", "sub"}


def _shape(node: Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _channels(node: Node) -> int:
    """Channels of a value: axis 1 (N, C, ...), or the features of a 2-D (N, F) value."""
    shape = _shape(node)
    return shape[1] if shape and len(shape) >= 2 else 0


@dataclass
class Group:
    """Values whose channels are tied, their channel sets, and what blocks pruning them."""

    values: list[str]
    channel_sets: list[frozenset[tuple[str, int]]]
    blocked_by: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """Whether channel sets of this group may be removed."""
        return not self.blocked_by and len(self.channel_sets) > 1


class ChannelGraph:
    """Channel-level dependencies of a traced graph with shapes; see the module docstring."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.graph = nx.Graph()
        self.blocked: dict[str, list[str]] = {}  # value -> reasons

    @classmethod
    def build(cls, gm: GraphModule) -> ChannelGraph:
        """Build the graph for ``gm`` (its nodes must carry ``tensor_meta``)."""
        self = cls(gm)
        for node in gm.graph.nodes:
            if node.op != "output":  # the output node only passes values on
                for c in range(_channels(node)):
                    self.graph.add_node((node.name, c))
            self._couple(node)
        return self

    def _block(self, node: Node, values: list[Node], reason: str) -> None:
        where = source_of(node)
        text = f"'{node.name}': {reason}" + (f" [{where}]" if where else "")
        for value in values:
            if _channels(value):
                self.blocked.setdefault(value.name, []).append(text)

    def _same(self, a: Node, b: Node) -> None:
        for c in range(min(_channels(a), _channels(b))):
            self.graph.add_edge((a.name, c), (b.name, c))

    def _couple(self, node: Node) -> None:
        inputs = [n for n in node.all_input_nodes if _channels(n)]
        if node.op == "placeholder":
            self._block(node, [node], "model input")
            return
        if node.op == "output":
            self._block(node, inputs, "model output")
            return
        if node.op == "get_attr" or (not inputs and not _channels(node)):
            return
        module = module_of(self.gm, node)
        layer = weighted_layer(module)
        if layer is not None:
            if isinstance(layer, CONVS) and layer.groups > 1:
                if layer.groups == layer.in_channels == layer.out_channels:
                    self._same(node.args[0], node)  # depthwise: channel k in, channel k out
                else:
                    self._block(node, [node.args[0], node], "grouped convolution")
            elif isinstance(layer, nn.Linear) and len(_shape(node) or ()) != 2:
                self._block(node, [node.args[0], node], "Linear over a non-2-D input")
            return
        if (
            type(module) in BATCHNORMS
            or isinstance(module, _ELEMENTWISE_MODULES)
            or (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)
        ):
            if _channels(node.args[0]) == _channels(node):
                self._same(node.args[0], node)
                return
        elif (node.op == "call_function" and node.target in _BINARY) or (
            node.op == "call_method" and node.target in _BINARY_METHODS
        ):
            same = [
                n
                for n in inputs
                if _channels(n) == _channels(node)
                and len(_shape(n) or ()) == len(_shape(node) or ())
            ]
            if same and all(n in same or _channels(n) == 1 for n in inputs):
                for value in same:
                    self._same(value, node)
                return
        elif node.op == "call_function" and node.target is torch.cat:
            if self._cat(node):
                return
        elif self._flatten(node) or self._mean(node):
            return
        self._block(node, [*inputs, node], f"{_describe(self.gm, node)} is not known to prune")

    def _cat(self, node: Node) -> bool:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0]
        if dim != 1 or not all(isinstance(p, Node) and _channels(p) for p in parts):
            return False
        offset = 0
        for part in parts:
            for c in range(_channels(part)):
                self.graph.add_edge((part.name, c), (node.name, offset + c))
            offset += _channels(part)
        return True

    def _flatten(self, node: Node) -> bool:
        is_flatten = (
            (node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")
            or isinstance(module_of(self.gm, node), nn.Flatten)
        )
        source = node.args[0] if node.args else None
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if isinstance(module_of(self.gm, node), nn.Flatten):
            start = module_of(self.gm, node).start_dim
        shape = _shape(source) if isinstance(source, Node) else None
        if not is_flatten or start != 1 or not shape or len(_shape(node) or ()) != 2:
            return False
        block = int(torch.Size(shape[2:]).numel())
        for c in range(shape[1]):
            for i in range(block):
                self.graph.add_edge((source.name, c), (node.name, c * block + i))
        return True

    def _mean(self, node: Node) -> bool:
        if not (node.op == "call_method" and node.target == "mean"):
            return False
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if not dims or 1 in dims or -len(_shape(node.args[0]) or ()) + 1 in dims:
            return False
        self._same(node.args[0], node)
        return True

    def groups(self) -> list[Group]:
        """Every group of tied values with its channel sets and blocking reasons."""
        value_graph = nx.Graph()
        for name, _ in self.graph.nodes:
            value_graph.add_node(name)
        for (a, _), (b, _) in self.graph.edges:
            value_graph.add_edge(a, b)
        sets_of: dict[str, list[frozenset]] = {}
        for component in nx.connected_components(self.graph):
            value = next(iter(component))[0]
            sets_of.setdefault(value, []).append(frozenset(component))
        groups = []
        for values in nx.connected_components(value_graph):
            channel_sets = {s for v in values for s in sets_of.get(v, [])}
            blocked = sorted({r for v in values for r in self.blocked.get(v, [])})
            order = [n.name for n in self.gm.graph.nodes if n.name in values]
            groups.append(Group(order, sorted(channel_sets, key=sorted), blocked))
        return groups


def _describe(gm: GraphModule, node: Node) -> str:
    return f"{node.op} {target_name(gm, node)}"
