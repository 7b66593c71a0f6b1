"""Channel rules: how each op ties the channels of its inputs and its output.

A rule is ``rule(graph, node) -> None | str``: it reads the spans of ``node``'s inputs
(``graph.span``) and records ``node``'s span and ties (``graph.claim``, ``same``, ``link``,
``tie``), returning None, or it returns the reason ``node`` blocks pruning (a known op that
cannot stay exact, such as a LayerNorm over the channels). ``rule_for`` finds a node's rule:
the caller's ``rules`` first (keyed by function, method name or module class), then the
built-in tables below; an op in neither is never guessed to be element-wise: it blocks
every group it touches and the report names it.

Example::

    def scaled_gelu(graph, node):              # y = gelu(x) * 2, channel k in is k out
        return channelwise(graph, node)
    fxcomp.passes.prune(0.5, channel_rules={my_module.scaled_gelu: scaled_gelu})
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node
from torchvision.ops import stochastic_depth

from fxcomp.ir.graph import BATCHNORMS, CONVS, ELEMENTWISE_MODULES
from fxcomp.nn.fused import add_relu, weighted_layer
from fxcomp.pruning.ties import ChannelTies, Span, Split, arg_of, calls, shape_of

__all__ = ["ChannelRule", "channelwise", "rule_for"]

ChannelRule = Callable[[ChannelTies, Node], str | None]

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
_BINARY = {
    operator.add,
    torch.add,
    operator.mul,
    torch.mul,
    operator.sub,
    torch.sub,
    operator.truediv,
    torch.div,
    operator.pow,
    torch.pow,
    add_relu,
}
_BINARY_METHODS = {"add", "mul", "sub", "div", "pow"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_SHAPE_QUERIES = {"size", "dim"}


def conv(graph: ChannelTies, node: Node, layer: nn.Module) -> str | None:
    x = node.args[0]
    graph.claim(node, Span(1, (layer.out_channels,)))
    if graph.span(x) != Span(1, (layer.in_channels,)):  # its own outputs are fine
        graph.block(node, [x], "convolution over a value whose channels are not on axis 1")
        return None
    groups = layer.groups
    if groups == 1:
        return None
    per_in, per_out = layer.in_channels // groups, layer.out_channels // groups
    if per_in == 1:  # depthwise: input channel i makes outputs i * per_out + t
        outputs = torch.arange(layer.out_channels)
        graph.link(x, node, outputs // per_out, outputs)
    else:  # grouped: every group keeps the same within-group channels
        graph.tie(x, torch.arange(layer.in_channels).view(groups, per_in))
        graph.tie(node, torch.arange(layer.out_channels).view(groups, per_out))
    return None


def linear(graph: ChannelTies, node: Node) -> str | None:
    x, shape = node.args[0], shape_of(node)
    graph.claim(node, Span(len(shape) - 1, (shape[-1],)))
    span, x_shape = graph.span(x), shape_of(x)
    if span is None or len(span.dims) != 1 or span.axis != len(x_shape) - 1:
        graph.block(node, [x], "Linear over a value whose channels are not its last axis")
    return None


def channelwise(graph: ChannelTies, node: Node, *, on_axis_1: bool = False) -> str | None:
    """Channel k in is channel k out: element-wise ops (same shape), and BatchNorm and
    pooling (``on_axis_1``: the channels must be axis 1, space may change)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    span = graph.span(x)
    if span is None:
        return None  # a value without channels: from parameters, or 1-D
    if on_axis_1 and (span.axis, len(span.dims)) != (1, 1):
        return f"{graph.describe(node)} over channels on axis {span.axis}"
    if not on_axis_1 and shape_of(x) != shape_of(node):
        return f"{graph.describe(node)} changes the shape"
    if not graph.claim(node, span):
        return "conflicting channel axes"
    graph.same(x, node)
    return None


def group_norm(graph: ChannelTies, node: Node, module: nn.GroupNorm) -> str | None:
    reason = channelwise(graph, node, on_axis_1=True)
    if reason is None:  # a group's channels are normalised together: they go together
        per_group = module.num_channels // module.num_groups
        graph.tie(node, torch.arange(module.num_channels).view(-1, per_group).T)
    return reason


def layer_norm(graph: ChannelTies, node: Node, normalized: int) -> str | None:
    span, ndim = graph.span(node.args[0]), len(shape_of(node))
    if span is not None and max(span.axes) >= ndim - normalized:
        return "LayerNorm normalises over the channels: removing one changes every other"
    return channelwise(graph, node)


def broadcast(graph: ChannelTies, node: Node) -> str | None:
    """Element-wise over broadcast inputs: full-extent inputs share the channels."""
    shape = shape_of(node)
    tensors = [a for a in node.args if isinstance(a, Node) and shape_of(a) is not None]
    aligned = []  # (input, its span moved to the output's axes)
    for value in tensors:
        span, offset = graph.spans.get(value.name), len(shape) - len(shape_of(value))
        if span is not None:
            aligned.append((value, Span(span.axis + offset, span.dims, span.unit)))
    full = [(v, s) for v, s in aligned if tuple(shape[a] for a in s.axes) == s.dims]
    if not full:
        return None if not aligned else "channels broadcast against another value"
    if len({(s.axis, s.dims) for _, s in full}) > 1:
        return "combines values whose channels lie on different axes"
    out = full[0][1]
    for value in tensors:
        offset = len(shape) - len(shape_of(value))
        extent = [shape_of(value)[a - offset] if a >= offset else 1 for a in out.axes]
        if math.prod(extent) == 1:
            continue
        if all(value is not v for v, _ in full):
            return f"'{value.name}' spans the channels and cannot be sliced"
    if not graph.claim(node, out):
        return "conflicting channel axes"
    for value, _ in full:
        graph.same(value, node)
    return None


def cat(graph: ChannelTies, node: Node) -> str | None:
    parts, shape = arg_of(node, 0, "tensors"), shape_of(node)
    dim = arg_of(node, 1, "dim", 0) % len(shape)
    spans = [graph.span(p) for p in parts]
    if any(s is None or len(s.dims) != 1 for s in spans):
        return "concatenates a value whose channels cannot be sliced"
    axis = spans[0].axis
    if any(s.axis != axis for s in spans):
        return "concatenates values with channels on different axes"
    if dim != axis:
        if len({s.dims for s in spans}) != 1 or not graph.claim(node, spans[0]):
            return "concatenates values with different channels"
        for part in parts:
            graph.same(part, node)
        return None
    graph.claim(node, Span(axis, (shape[axis],)))
    offset = 0
    for part, span in zip(parts, spans, strict=True):
        channels = torch.arange(span.size)
        graph.link(part, node, channels, channels + offset)
        offset += span.size
    return None


def split(graph: ChannelTies, node: Node) -> str | None:
    x = node.args[0]
    span, shape = graph.span(x), shape_of(x)
    if span is None:
        return "splits a value whose channels are unknown"
    dim = arg_of(node, 2, "dim", 0) % len(shape)
    chunks = node.target in (torch.chunk, "chunk")
    size = arg_of(node, 1, "chunks" if chunks else "split_size_or_sections")
    split = torch.chunk if chunks else torch.split
    pieces = split(torch.empty(shape, device="meta"), size, dim)
    if dim in span.axes and len(span.dims) != 1:
        return "splits channels that span several axes"
    graph.splits[node.name] = Split(x, dim, tuple(p.shape[dim] for p in pieces))
    return None


def getitem(graph: ChannelTies, node: Node) -> str | None:
    source, index = node.args
    split = graph.splits.get(source.name) if isinstance(source, Node) else None
    if split is not None:
        span = graph.spans[split.source.name]
        if split.dim != span.axis:
            graph.claim(node, span)
            graph.same(split.source, node)
            return None
        index %= len(split.sizes)
        offset = sum(split.sizes[:index])
        graph.claim(node, Span(span.axis, (split.sizes[index],)))
        channels = torch.arange(split.sizes[index])
        graph.link(split.source, node, channels + offset, channels)
        return None
    span = graph.span(source)
    if span is None:
        return None if shape_of(source) or shape_of(node) is None else "an unknown op's output"
    return _index(graph, node, source, span, index)


def _index(graph: ChannelTies, node: Node, source: Node, span: Span, index: object) -> str | None:
    """Basic indexing that leaves the channel axes whole (``x[:, 0]``, ``x[..., :8]``)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not isinstance(i, int | slice | type(None) | type(Ellipsis)) for i in items):
        return "advanced indexing"
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(shape_of(source)) - sum(1 for i in items if i is not None and i != Ellipsis)
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
    graph.claim(node, Span(new_axis, span.dims, span.unit))
    graph.same(source, node)
    return None


def reshape(graph: ChannelTies, node: Node) -> str | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    span, before, after = graph.span(x), shape_of(x), shape_of(node)
    if span is None:
        return None if before is None else "reshapes a value whose channels are unknown"
    outer = math.prod(before[: span.axis])
    starts = [a for a in range(len(after)) if math.prod(after[:a]) == outer]
    for axis in reversed(starts):  # size-1 axes make several starts possible
        if _reshaped(graph, node, x, span, axis, before, after):
            return None
    return "reshape mixes the channels with other axes"


def reshape_as(graph: ChannelTies, node: Node) -> str | None:
    """``x.reshape_as(other)``, ``x.view_as(other)``: a reshape to ``other``'s shape, which
    then has to shrink with the channels: ``other`` is tied to the result."""
    blocked = reshape(graph, node)
    other, span = node.args[1], graph.span(node)
    if blocked is not None or span is None:
        return blocked
    theirs = graph.span(other)
    if theirs is None or (theirs.axis, theirs.dims) != (span.axis, span.dims):
        return "reshapes to the shape of a value whose channels do not follow"
    graph.same(other, node)
    return None


def _reshaped(
    graph: ChannelTies, node: Node, x: Node, span: Span, axis: int, before: tuple, after: tuple
) -> bool:
    """Tie ``x`` and its reshape ``node`` if the channels start output axis ``axis``."""
    ends = [b for b in range(axis + 1, len(after) + 1) if math.prod(after[axis:b]) == span.size]
    if ends:
        dims = after[axis : ends[0]]
        if dims == span.dims or len(dims) == 1:  # unchanged, or merged back into one axis
            graph.claim(node, Span(axis, dims, span.unit if dims == span.dims else 0))
        elif len(span.dims) == 1:  # split into (groups, per group): keep groups regular
            unit = max(range(len(dims)), key=lambda i: (dims[i], i))
            graph.claim(node, Span(axis, dims, unit))
            copies = torch.arange(span.size).view(dims).movedim(unit, -1)
            graph.tie(node, copies.reshape(-1, dims[unit]))
        else:
            return False
        graph.same(x, node)
        return True
    inner = after[axis] // span.size
    trailing = before[span.axis + len(span.dims) :]
    merged = [math.prod(trailing[:k]) for k in range(len(trailing) + 1)]
    if after[axis] % span.size or inner not in merged:
        return False
    graph.claim(node, Span(axis, (after[axis],)))  # flatten: channel c is a block of inner
    features = torch.arange(after[axis])
    graph.link(x, node, features // inner, features)
    return True


def permute(graph: ChannelTies, node: Node) -> str | None:
    x = node.args[0]
    span, ndim = graph.span(x), len(shape_of(x))
    if span is None:
        return None if shape_of(node) is None else "permutes a value whose channels are unknown"
    if calls(node, {torch.transpose}, {"transpose"}):
        a, b = (d % ndim for d in node.args[1:3])
        order = list(range(ndim))
        order[a], order[b] = b, a
    else:
        dims = node.args[1:] if len(node.args) > 2 else arg_of(node, 1, "dims")
        order = [d % ndim for d in dims]
    moved = sorted(order.index(a) for a in span.axes)
    if moved != list(range(moved[0], moved[0] + len(moved))):
        return "permute separates the channel axes"
    inner = [order[p] - span.axis for p in moved]  # old span axis at each new position
    flat = torch.arange(span.size).view(span.dims).permute(inner).reshape(-1)
    dims = tuple(span.dims[i] for i in inner)
    graph.claim(node, Span(moved[0], dims, inner.index(span.unit)))
    graph.link(x, node, flat, torch.arange(span.size))
    return None


def reduce(graph: ChannelTies, node: Node) -> str | None:
    x = node.args[0]
    span, ndim = graph.span(x), len(shape_of(x))
    dims = arg_of(node, 1, "dim")
    if span is None:
        return None
    if dims is None:
        return "reduces over every axis, the channels included"
    dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    if dims & set(span.axes):
        return "reduces over the channels"
    keepdim = arg_of(node, 2, "keepdim", False)
    shift = 0 if keepdim else sum(1 for d in dims if d < span.axis)
    graph.claim(node, Span(span.axis - shift, span.dims, span.unit))
    graph.same(x, node)
    return None


# -- results --------------------------------------------------------------------------


def _weighted(graph: ChannelTies, node: Node) -> str | None:
    layer = weighted_layer(graph.module(node))
    return conv(graph, node, layer) if isinstance(layer, CONVS) else linear(graph, node)


def _on_axis_1(graph: ChannelTies, node: Node) -> str | None:
    return channelwise(graph, node, on_axis_1=True)


def _group_norm(graph: ChannelTies, node: Node) -> str | None:
    return group_norm(graph, node, graph.module(node))


def _layer_norm_module(graph: ChannelTies, node: Node) -> str | None:
    return layer_norm(graph, node, len(graph.module(node).normalized_shape))


def _layer_norm_call(graph: ChannelTies, node: Node) -> str | None:
    shape = arg_of(node, 1, "normalized_shape")
    return layer_norm(graph, node, 1 if isinstance(shape, int) else len(shape))


def _packed_attention(graph: ChannelTies, node: Node) -> str | None:
    return "nn.MultiheadAttention reads its packed projections inside (run unpack_attention)"


def _reads_sizes(graph: ChannelTies, node: Node) -> str | None:
    return None  # a view built from the sizes follows the pruned shape


# Built-in rules as data: module classes (isinstance, in order), functions, method names.
_MODULE_RULES: tuple[tuple[type | tuple[type, ...], ChannelRule], ...] = (
    (nn.GroupNorm, _group_norm),
    (nn.MultiheadAttention, _packed_attention),
    (nn.LayerNorm, _layer_norm_module),
    (_POOL_MODULES, _on_axis_1),
    (ELEMENTWISE_MODULES, channelwise),
    ((nn.Flatten, nn.Unflatten), reshape),
)
_FUNCTION_RULES: dict[Any, ChannelRule] = {
    F.layer_norm: _layer_norm_call,
    **dict.fromkeys(_POOL_FUNCTIONS, _on_axis_1),
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, channelwise),
    **dict.fromkeys(_BINARY, broadcast),
    torch.cat: cat,
    torch.concat: cat,
    torch.split: split,
    torch.chunk: split,
    operator.getitem: getitem,
    torch.flatten: reshape,
    torch.reshape: reshape,
    torch.permute: permute,
    torch.transpose: permute,
    torch.mean: reduce,
    torch.sum: reduce,
    torch.amax: reduce,
    getattr: _reads_sizes,
}
_METHOD_RULES: dict[str, ChannelRule] = {
    **dict.fromkeys(_ELEMENTWISE_METHODS, channelwise),
    **dict.fromkeys((*_BINARY_METHODS, "expand"), broadcast),
    "split": split,
    "chunk": split,
    **dict.fromkeys(("view", "reshape", "flatten", "unflatten"), reshape),
    **dict.fromkeys(("view_as", "reshape_as"), reshape_as),
    "permute": permute,
    "transpose": permute,
    **dict.fromkeys(_REDUCTIONS, reduce),
    **dict.fromkeys(_SHAPE_QUERIES, _reads_sizes),
}


def rule_for(
    graph: ChannelTies, node: Node, rules: Mapping[Any, ChannelRule] = {}
) -> ChannelRule | None:
    """The rule for ``node``: from ``rules`` (the caller's: keyed by function, method name or
    module class), else the built-in one, else None (the op is not known).

    Example::

        rule = rule_for(graph, node, {torch.special.erf: channelwise})
    """
    module = graph.module(node)
    if module is not None:
        mine = next(
            (r for key, r in rules.items() if isinstance(key, type) and isinstance(module, key)),
            None,
        )
        if mine is not None:
            return mine
        if weighted_layer(module) is not None:
            return _weighted
        if type(module) in BATCHNORMS:
            return _on_axis_1
        return next((rule for types, rule in _MODULE_RULES if isinstance(module, types)), None)
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return rules.get(node.target) or (
            _FUNCTION_RULES if node.op == "call_function" else _METHOD_RULES
        ).get(node.target)
    except TypeError:  # an unhashable target
        return None
