"""The channel dependency graph: which channels of which values must be pruned together.

A vertex is one channel of one value: ``(node name, index)``. A value's channels lie on
its ``Span``: axis 1 for convolution-style tensors (N, C, ...), the last axis for what a
Linear makes or takes (N, ..., F); after a channel-shuffle view they span two axes
(groups, channels per group) and the index is flat over both. An edge joins two channels
that an op ties together: a BatchNorm's input and output channel, the same channel of every
input and the output of an element-wise op (broadcasting included), a depthwise
convolution's input and its outputs, a ``cat`` input channel and its offset in the output,
a ``split``/``chunk`` piece and its offset in the input, a channel before ``flatten`` (or a
``view`` that flattens) and its block of features after it, the same channel moved by a
``permute``/``transpose``. Some ties keep shapes regular: the channels of one GroupNorm
group go together, a grouped convolution loses the same within-group channel in every
group, a shuffle view the same channel of every group. A connected component is a *channel
set*: removing it means removing every one of its channels. Values whose channels are
linked form a *group*.

Convolution and Linear outputs start new channels (their weights' rows); their inputs are
consumed through weight columns. Any op that touches a value's channels and is not known
here blocks every group it touches (never guessed element-wise), and so does an op that is
known but cannot stay exact: a LayerNorm over the channels, a parameter spanning them. So
do the model's inputs and outputs.

Example::

    graph = ChannelGraph.build(gm)
    for group in graph.groups():
        summary = (group.values, len(group.channel_sets), group.blocked_by)
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn
from torch.fx import GraphModule, Node
from torchvision.ops import stochastic_depth

from fxcomp.channel_attention import AttentionCore, find_attention, is_mask_builder
from fxcomp.fused import add_relu, weighted_layer
from fxcomp.graph import (
    BATCHNORMS,
    CONVS,
    ELEMENTWISE_MODULES,
    module_of,
    source_of,
    target_name,
)

__all__ = ["ChannelGraph", "Group", "Span"]

_POOL_MODULES = (
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
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
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
    stochastic_depth,  # torchvision's: drops whole samples, channel k in is channel k out
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clamp", "clone"}
_BINARY = {operator.add, torch.add, operator.mul, torch.mul, operator.sub, torch.sub, add_relu}
_BINARY_METHODS = {"add", "mul", "sub"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_SHAPE_QUERIES = {"size", "dim"}


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


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _arg(node: Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _is(node: Node, functions: set, methods: set | tuple = ()) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


class ChannelGraph:
    """Channel-level dependencies of a traced graph with shapes; see the module docstring."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.edges: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
        self.spans: dict[str, Span] = {}
        self.splits: dict[str, Split] = {}
        self.blocked: dict[str, list[str]] = {}  # value -> reasons
        cores, self.attention_refusals = find_attention(gm)
        self.attention = {core.out.name: core for core in cores}  # by merged output
        self.absorbed = {name for core in cores for name in core.labels}

    @classmethod
    def build(cls, gm: GraphModule) -> ChannelGraph:
        """Build the graph for ``gm`` (its nodes must carry ``tensor_meta``)."""
        self = cls(gm)
        for node in gm.graph.nodes:
            if node.name in self.attention:
                self._attend(node, self.attention[node.name])
            elif node.name not in self.absorbed:
                self._couple(node)
        return self

    # -- vertices and edges ---------------------------------------------------------------

    def _claim(self, node: Node, span: Span) -> bool:
        """Give ``node``'s value ``span``; False when it already has a different one."""
        have = self.spans.get(node.name)
        if have is None:
            self.spans[node.name] = span
            return True
        return (have.axis, have.dims) == (span.axis, span.dims)

    def _link(self, a: Node, b: Node, channels_a: torch.Tensor, channels_b: torch.Tensor) -> None:
        """Tie channel ``channels_a[i]`` of ``a`` to channel ``channels_b[i]`` of ``b``."""
        self.edges.append((a.name, b.name, channels_a, channels_b))

    def _same(self, a: Node, b: Node) -> None:
        channels = torch.arange(self.spans[a.name].size)
        self._link(a, b, channels, channels)

    def _tie(self, node: Node, index: torch.Tensor) -> None:
        """Tie the channels in each column of ``index`` (rows: the copies to keep alike)."""
        self._link(node, node, index[:1].expand_as(index).reshape(-1), index.reshape(-1))

    def _block(self, node: Node, values: list[Node], reason: str) -> None:
        where = source_of(node)
        text = f"'{node.name}': {reason}" + (f" [{where}]" if where else "")
        for value in values:
            split = self.splits.get(value.name)
            self.blocked.setdefault((split.source if split else value).name, []).append(text)

    # -- ops ------------------------------------------------------------------------------

    def _couple(self, node: Node) -> None:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape and len(shape) >= 2:
                self._claim(node, Span(1, (shape[1],)))
                self._block(node, [node], "model input")
            return
        inputs = [n for n in node.all_input_nodes if _shape(n) or n.name in self.splits]
        if node.op == "output":
            self._block(node, inputs, "model output")
            return
        if node.op == "get_attr" or not (inputs or shape):
            return
        reason = self._dispatch(node)
        if reason is None:
            return
        if shape and len(shape) >= 2 and node.name not in self.spans:
            self._claim(node, self._guess(node, inputs, shape))
        self._block(node, [*inputs, node], reason)

    def _guess(self, node: Node, inputs: list[Node], shape: tuple[int, ...]) -> Span:
        """A blocked op's output channels (so that what follows is tied to the blocked
        group): on its first input's channel axis if it has as many axes, else axis 1."""
        for value in inputs:
            span = self.spans.get(value.name)
            if span is not None and len(_shape(value)) == len(shape):
                return span if _shape(value) == shape else Span(span.axis, (shape[span.axis],))
        return Span(1, (shape[1],))

    def _dispatch(self, node: Node) -> str | None:
        """Tie ``node``'s channels to its inputs'; the reason to block them when it cannot."""
        module = module_of(self.gm, node)
        layer = weighted_layer(module)
        if layer is not None:
            return self._conv(node, layer) if isinstance(layer, CONVS) else self._linear(node)
        if type(module) in BATCHNORMS:
            return self._channelwise(node, on_axis_1=True)
        if isinstance(module, nn.GroupNorm):
            return self._group_norm(node, module)
        if isinstance(module, nn.MultiheadAttention):
            return (
                "nn.MultiheadAttention reads its packed projections inside (run unpack_attention)"
            )
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, len(module.normalized_shape))
        if _is(node, {F.layer_norm}):
            shape = _arg(node, 1, "normalized_shape")
            return self._layer_norm(node, 1 if isinstance(shape, int) else len(shape))
        if isinstance(module, _POOL_MODULES) or _is(node, _POOL_FUNCTIONS):
            return self._channelwise(node, on_axis_1=True)
        if isinstance(module, ELEMENTWISE_MODULES) or _is(
            node, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS
        ):
            return self._channelwise(node)
        if _is(node, _BINARY, _BINARY_METHODS | {"expand"}):
            return self._broadcast(node)
        if _is(node, {torch.cat, torch.concat}):
            return self._cat(node)
        if _is(node, {torch.split, torch.chunk}, {"split", "chunk"}):
            return self._split(node)
        if node.op == "call_function" and node.target is operator.getitem:
            return self._getitem(node)
        if isinstance(module, nn.Flatten | nn.Unflatten) or _is(
            node, {torch.flatten, torch.reshape}, {"view", "reshape", "flatten", "unflatten"}
        ):
            return self._reshape(node)
        if _is(node, {torch.permute, torch.transpose}, {"permute", "transpose"}):
            return self._permute(node)
        if _is(node, {torch.mean, torch.sum, torch.amax}, _REDUCTIONS):
            return self._reduce(node)
        if _is(node, {getattr}, _SHAPE_QUERIES) or is_mask_builder(node):
            return None  # reads sizes: a view built from them follows the pruned shape
        if node.name in self.attention_refusals:
            return self.attention_refusals[node.name]
        return f"{_describe(self.gm, node)} is not known to prune"

    def _attend(self, out: Node, core: AttentionCore) -> None:
        """Tie the query and key projections' channels, and the value projection's to the
        merged output's, one within-head dimension of every head at a time
        (``fxcomp.channel_attention``)."""
        spans = [self.spans.get(v.name) for v in (core.q, core.k, core.v)]
        last = [Span(len(_shape(v)) - 1, (_shape(v)[-1],)) for v in (core.q, core.k, core.v)]
        shape = _shape(out)
        self._claim(out, Span(len(shape) - 1, (shape[-1],)))
        if spans != last:
            self._block(out, [core.q, core.k, core.v, out], "attention over unknown channels")
            return
        self._same(core.q, core.k)
        self._tie(core.q, torch.arange(core.heads * core.qk_dim).view(core.heads, -1))
        self._same(core.v, out)
        self._tie(core.v, torch.arange(core.heads * core.v_dim).view(core.heads, -1))

    def _input_span(self, node: Node, value: object) -> Span | None:
        return self.spans.get(value.name) if isinstance(value, Node) else None

    def _conv(self, node: Node, layer: nn.Module) -> str | None:
        x = node.args[0]
        self._claim(node, Span(1, (layer.out_channels,)))
        if self._input_span(node, x) != Span(1, (layer.in_channels,)):  # its own outputs are fine
            self._block(node, [x], "convolution over a value whose channels are not on axis 1")
            return None
        groups = layer.groups
        if groups == 1:
            return None
        per_in, per_out = layer.in_channels // groups, layer.out_channels // groups
        if per_in == 1:  # depthwise: input channel i makes outputs i * per_out + t
            outputs = torch.arange(layer.out_channels)
            self._link(x, node, outputs // per_out, outputs)
        else:  # grouped: every group keeps the same within-group channels
            self._tie(x, torch.arange(layer.in_channels).view(groups, per_in))
            self._tie(node, torch.arange(layer.out_channels).view(groups, per_out))
        return None

    def _linear(self, node: Node) -> str | None:
        x, shape = node.args[0], _shape(node)
        self._claim(node, Span(len(shape) - 1, (shape[-1],)))
        span, x_shape = self._input_span(node, x), _shape(x)
        if span is None or len(span.dims) != 1 or span.axis != len(x_shape) - 1:
            self._block(node, [x], "Linear over a value whose channels are not its last axis")
        return None

    def _channelwise(self, node: Node, *, on_axis_1: bool = False) -> str | None:
        """Channel k in is channel k out: element-wise ops (same shape), and BatchNorm and
        pooling (``on_axis_1``: the channels must be axis 1, space may change)."""
        x = node.args[0] if node.args else node.kwargs.get("input")
        span = self._input_span(node, x)
        if span is None:
            return None  # a value without channels: from parameters, or 1-D
        if on_axis_1 and (span.axis, len(span.dims)) != (1, 1):
            return f"{_describe(self.gm, node)} over channels on axis {span.axis}"
        if not on_axis_1 and _shape(x) != _shape(node):
            return f"{_describe(self.gm, node)} changes the shape"
        if not self._claim(node, span):
            return "conflicting channel axes"
        self._same(x, node)
        return None

    def _group_norm(self, node: Node, module: nn.GroupNorm) -> str | None:
        reason = self._channelwise(node, on_axis_1=True)
        if reason is None:  # a group's channels are normalised together: they go together
            per_group = module.num_channels // module.num_groups
            self._tie(node, torch.arange(module.num_channels).view(-1, per_group).T)
        return reason

    def _layer_norm(self, node: Node, normalized: int) -> str | None:
        span, ndim = self._input_span(node, node.args[0]), len(_shape(node))
        if span is not None and max(span.axes) >= ndim - normalized:
            return "LayerNorm normalises over the channels: removing one changes every other"
        return self._channelwise(node)

    def _broadcast(self, node: Node) -> str | None:
        """Element-wise over broadcast inputs: full-extent inputs share the channels."""
        shape = _shape(node)
        tensors = [a for a in node.args if isinstance(a, Node) and _shape(a) is not None]
        aligned = []  # (input, its span moved to the output's axes)
        for value in tensors:
            span, offset = self.spans.get(value.name), len(shape) - len(_shape(value))
            if span is not None:
                aligned.append((value, Span(span.axis + offset, span.dims, span.unit)))
        full = [(v, s) for v, s in aligned if tuple(shape[a] for a in s.axes) == s.dims]
        if not full:
            return None if not aligned else "channels broadcast against another value"
        if len({(s.axis, s.dims) for _, s in full}) > 1:
            return "combines values whose channels lie on different axes"
        out = full[0][1]
        for value in tensors:
            offset = len(shape) - len(_shape(value))
            extent = [_shape(value)[a - offset] if a >= offset else 1 for a in out.axes]
            if math.prod(extent) == 1:
                continue
            if all(value is not v for v, _ in full):
                return f"'{value.name}' spans the channels and cannot be sliced"
        if not self._claim(node, out):
            return "conflicting channel axes"
        for value, _ in full:
            self._same(value, node)
        return None

    def _cat(self, node: Node) -> str | None:
        parts, shape = _arg(node, 0, "tensors"), _shape(node)
        dim = _arg(node, 1, "dim", 0) % len(shape)
        spans = [self._input_span(node, p) for p in parts]
        if any(s is None or len(s.dims) != 1 for s in spans):
            return "concatenates a value whose channels cannot be sliced"
        axis = spans[0].axis
        if any(s.axis != axis for s in spans):
            return "concatenates values with channels on different axes"
        if dim != axis:
            if len({s.dims for s in spans}) != 1 or not self._claim(node, spans[0]):
                return "concatenates values with different channels"
            for part in parts:
                self._same(part, node)
            return None
        self._claim(node, Span(axis, (shape[axis],)))
        offset = 0
        for part, span in zip(parts, spans, strict=True):
            channels = torch.arange(span.size)
            self._link(part, node, channels, channels + offset)
            offset += span.size
        return None

    def _split(self, node: Node) -> str | None:
        x = node.args[0]
        span, shape = self._input_span(node, x), _shape(x)
        if span is None:
            return "splits a value whose channels are unknown"
        dim = _arg(node, 2, "dim", 0) % len(shape)
        chunks = node.target in (torch.chunk, "chunk")
        size = _arg(node, 1, "chunks" if chunks else "split_size_or_sections")
        split = torch.chunk if chunks else torch.split
        pieces = split(torch.empty(shape, device="meta"), size, dim)
        if dim in span.axes and len(span.dims) != 1:
            return "splits channels that span several axes"
        self.splits[node.name] = Split(x, dim, tuple(p.shape[dim] for p in pieces))
        return None

    def _getitem(self, node: Node) -> str | None:
        source, index = node.args
        split = self.splits.get(source.name) if isinstance(source, Node) else None
        if split is not None:
            span = self.spans[split.source.name]
            if split.dim != span.axis:
                self._claim(node, span)
                self._same(split.source, node)
                return None
            index %= len(split.sizes)
            offset = sum(split.sizes[:index])
            self._claim(node, Span(span.axis, (split.sizes[index],)))
            channels = torch.arange(split.sizes[index])
            self._link(split.source, node, channels + offset, channels)
            return None
        span = self._input_span(node, source)
        if span is None:
            return None if _shape(source) or _shape(node) is None else "an unknown op's output"
        return self._index(node, source, span, index)

    def _index(self, node: Node, source: Node, span: Span, index: object) -> str | None:
        """Basic indexing that leaves the channel axes whole (``x[:, 0]``, ``x[..., :8]``)."""
        items = list(index) if isinstance(index, tuple) else [index]
        if any(not isinstance(i, int | slice | type(None) | type(Ellipsis)) for i in items):
            return "advanced indexing"
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = len(_shape(source)) - sum(1 for i in items if i is not None and i != Ellipsis)
            items[at : at + 1] = [slice(None)] * fill
        axis_in, axis_out, new_axis = 0, 0, None
        for item in items:
            if item is None:
                axis_out += 1
                continue
            if axis_in in span.axes:
                if item != slice(None):
                    return "indexes into the channels"
                new_axis = axis_out if new_axis is None else new_axis
            axis_out += 0 if isinstance(item, int) else 1
            axis_in += 1
        new_axis = axis_out + span.axis - axis_in if new_axis is None else new_axis
        self._claim(node, Span(new_axis, span.dims, span.unit))
        self._same(source, node)
        return None

    def _reshape(self, node: Node) -> str | None:
        x = node.args[0] if node.args else node.kwargs.get("input")
        span, before, after = self._input_span(node, x), _shape(x), _shape(node)
        if span is None:
            return None if before is None else "reshapes a value whose channels are unknown"
        outer = math.prod(before[: span.axis])
        starts = [a for a in range(len(after)) if math.prod(after[:a]) == outer]
        for axis in reversed(starts):  # size-1 axes make several starts possible
            if self._reshaped(node, x, span, axis, before, after):
                return None
        return "reshape mixes the channels with other axes"

    def _reshaped(
        self, node: Node, x: Node, span: Span, axis: int, before: tuple, after: tuple
    ) -> bool:
        """Tie ``x`` and its reshape ``node`` if the channels start output axis ``axis``."""
        ends = [b for b in range(axis + 1, len(after) + 1) if math.prod(after[axis:b]) == span.size]
        if ends:
            dims = after[axis : ends[0]]
            if dims == span.dims or len(dims) == 1:  # unchanged, or merged back into one axis
                self._claim(node, Span(axis, dims, span.unit if dims == span.dims else 0))
            elif len(span.dims) == 1:  # split into (groups, per group): keep groups regular
                unit = max(range(len(dims)), key=lambda i: (dims[i], i))
                self._claim(node, Span(axis, dims, unit))
                copies = torch.arange(span.size).view(dims).movedim(unit, -1)
                self._tie(node, copies.reshape(-1, dims[unit]))
            else:
                return False
            self._same(x, node)
            return True
        inner = after[axis] // span.size
        trailing = before[span.axis + len(span.dims) :]
        merged = [math.prod(trailing[:k]) for k in range(len(trailing) + 1)]
        if after[axis] % span.size or inner not in merged:
            return False
        self._claim(node, Span(axis, (after[axis],)))  # flatten: channel c is a block of inner
        features = torch.arange(after[axis])
        self._link(x, node, features // inner, features)
        return True

    def _permute(self, node: Node) -> str | None:
        x = node.args[0]
        span, ndim = self._input_span(node, x), len(_shape(x))
        if span is None:
            return None if _shape(node) is None else "permutes a value whose channels are unknown"
        if _is(node, {torch.transpose}, {"transpose"}):
            a, b = (d % ndim for d in node.args[1:3])
            order = list(range(ndim))
            order[a], order[b] = b, a
        else:
            dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
            order = [d % ndim for d in dims]
        moved = sorted(order.index(a) for a in span.axes)
        if moved != list(range(moved[0], moved[0] + len(moved))):
            return "permute separates the channel axes"
        inner = [order[p] - span.axis for p in moved]  # old span axis at each new position
        flat = torch.arange(span.size).view(span.dims).permute(inner).reshape(-1)
        dims = tuple(span.dims[i] for i in inner)
        self._claim(node, Span(moved[0], dims, inner.index(span.unit)))
        self._link(x, node, flat, torch.arange(span.size))
        return None

    def _reduce(self, node: Node) -> str | None:
        x = node.args[0]
        span, ndim = self._input_span(node, x), len(_shape(x))
        dims = _arg(node, 1, "dim")
        if span is None:
            return None
        if dims is None:
            return "reduces over every axis, the channels included"
        dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
        if dims & set(span.axes):
            return "reduces over the channels"
        keepdim = _arg(node, 2, "keepdim", False)
        shift = 0 if keepdim else sum(1 for d in dims if d < span.axis)
        self._claim(node, Span(span.axis - shift, span.dims, span.unit))
        self._same(x, node)
        return None

    # -- results --------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        """Every group of tied values with its channel sets and blocking reasons.

        Channel sets are the connected components of the channel-level graph (one vertex per
        channel, found with scipy's sparse graph routines); groups are those of the
        value-level graph (networkx).
        """
        start, total = {}, 0
        for name, span in self.spans.items():
            start[name], total = total, total + span.size
        if self.edges:
            src = torch.cat([start[a] + ca for a, _, ca, _ in self.edges]).numpy()
            dst = torch.cat([start[b] + cb for _, b, _, cb in self.edges]).numpy()
        else:
            src = dst = np.zeros(0, dtype=np.int64)
        adjacency = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), (total, total))
        labels = torch.from_numpy(connected_components(adjacency, directed=False)[1])
        value_graph = nx.Graph()
        value_graph.add_nodes_from(self.spans)
        value_graph.add_edges_from((a, b) for a, b, _, _ in self.edges)
        position = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        groups = []
        for values in nx.connected_components(value_graph):
            order = sorted(values, key=position.__getitem__)
            own = {v: labels[start[v] : start[v] + self.spans[v].size] for v in order}
            found, numbered = torch.unique(torch.cat(list(own.values())), return_inverse=True)
            members = dict(zip(order, numbered.split([len(t) for t in own.values()]), strict=True))
            blocked = sorted({r for v in values for r in self.blocked.get(v, [])})
            groups.append(Group(order, members, len(found), blocked))
        return sorted(groups, key=lambda g: position[g.values[0]])


def _describe(gm: GraphModule, node: Node) -> str:
    return f"{node.op} {target_name(gm, node)}"
