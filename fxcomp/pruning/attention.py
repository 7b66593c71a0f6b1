"""Attention in the channel graph: which projection channels prune together through
``scaled_dot_product_attention``.

Between the projections and the attention, and between the attention and the output
projection, the graph only moves axes: the query projection's last axis is split into
(heads, width), the heads are moved next to the batch, and after the attention the heads
and the value width are merged back. ``find_attention`` follows those layout ops from
every ``scaled_dot_product_attention`` node, tracking which axis is which, and accepts the
attention only when the layout is exactly that: channel ``c`` of a projection is
dimension ``c % width`` of head ``c // width``.

Then pruning within the heads is exact: removing dimension ``d`` from the queries and the
keys of a head removes one term of every score ``q . k`` (the softmax scale is kept), and
removing dimension ``e`` from the values removes one output feature of that head, which the
output projection's columns read. Where the graph leaves the scale to
``scaled_dot_product_attention``, which would take it from the new width, pruning writes the
original ``1 / sqrt(width)`` in. The heads keep equal widths, so one dimension goes from
every head at once: the query and key projections' channels ``h * width + d`` of all heads
``h`` form one channel set, and the value projection's and the merged output's likewise.

Example::

    cores, refusals = find_attention(gm)
    for core in cores:
        core.heads, core.qk_dim, core.v_dim
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from fxcomp.ir.trace import tensor_metadata
from fxcomp.nn.attention import Attention, merge_masks

__all__ = ["AttentionCore", "find_attention", "is_mask_builder"]

_SCALE = 6  # scaled_dot_product_attention's positional scale
_MOVES = {"transpose", "permute", "contiguous", torch.transpose, torch.permute}
_RESHAPES = {"unflatten", "view", "reshape", "flatten", torch.flatten, torch.reshape}


@dataclass
class AttentionCore:
    """One attention whose projections prune together (module docstring).

    ``q``, ``k`` and ``v`` are the values before the layout ops (channels on their last
    axis), ``out`` the merged output after them. ``labels`` gives every absorbed node's
    axes (``"d"`` query/key width, ``"e"`` value width, ``"h"`` heads, ``"c"`` a merged
    channel axis of the queries and keys, ``"m"`` of the values), and ``sizes`` the literal
    sizes to rewrite once widths change: ``(node, position, axis label)``.
    """

    sdpa: Node
    q: Node
    k: Node
    v: Node
    out: Node
    heads: int
    qk_dim: int
    v_dim: int
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sizes: list[tuple[Node, int, str]] = field(default_factory=list)

    def resize(self, gm: GraphModule, qk_dim: int, v_dim: int) -> None:
        """Rewrite the literal sizes and the shapes of the absorbed nodes for per-head
        widths ``qk_dim`` and ``v_dim``, and the ``Attention`` module's record of them."""
        extent = {"d": qk_dim, "e": v_dim, "c": self.heads * qk_dim, "m": self.heads * v_dim}
        self._fix_scale()
        for node, position, label in self.sizes:
            start, sizes = _size_args(node)
            sizes[position] = extent[label]
            if node.target == "unflatten":
                node.args = (*node.args[:2], tuple(sizes))
            elif start == 1 and len(node.args) == 2 and isinstance(node.args[1], list | tuple):
                node.args = (node.args[0], sizes)
            else:
                node.args = (node.args[0], *sizes)
        for node in gm.graph.nodes:
            labels = self.labels.get(node.name)
            meta = node.meta.get("tensor_meta")
            if labels is not None and hasattr(meta, "shape"):
                shape = [extent.get(a, n) for a, n in zip(labels, meta.shape, strict=True)]
                empty = torch.empty(shape, dtype=meta.dtype, device="meta")
                node.meta["tensor_meta"] = tensor_metadata(empty)
        owner = self._owner(gm)
        if owner is not None:
            owner.qk_dim, owner.v_dim = qk_dim, v_dim

    def _fix_scale(self) -> None:
        """Make the softmax scale a constant: left out, it follows the query width."""
        if len(self.sdpa.args) > _SCALE:
            if self.sdpa.args[_SCALE] is None:
                args = list(self.sdpa.args)
                args[_SCALE] = 1 / math.sqrt(self.qk_dim)
                self.sdpa.args = tuple(args)
        elif self.sdpa.kwargs.get("scale") is None:
            self.sdpa.kwargs = {**self.sdpa.kwargs, "scale": 1 / math.sqrt(self.qk_dim)}

    def _owner(self, gm: GraphModule) -> Attention | None:
        """The ``Attention`` module whose projections these are, if any."""
        if self.q.op != "call_module" or "." not in str(self.q.target):
            return None
        owner = gm.get_submodule(str(self.q.target).rpartition(".")[0])
        return owner if isinstance(owner, Attention) else None


def _is(node: Node, ops: set) -> bool:
    return node.op in ("call_method", "call_function") and node.target in ops


def _shape(node: Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _size_args(node: Node) -> tuple[int, list]:
    """Where a reshape's sizes start in ``node.args``, and the sizes."""
    if node.target == "unflatten":
        return 2, list(node.args[2])
    if len(node.args) == 2 and isinstance(node.args[1], list | tuple):
        return 1, list(node.args[1])
    return 1, list(node.args[1:])


def _move(node: Node, labels: tuple[str, ...]) -> tuple[str, ...] | None:
    if node.target == "contiguous":
        return labels
    ndim = len(labels)
    if node.target in ("transpose", torch.transpose):
        a, b = (d % ndim for d in node.args[1:3])
        order = list(range(ndim))
        order[a], order[b] = b, a
    else:
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        order = [d % ndim for d in dims]
    return tuple(labels[i] for i in order)


def _split(
    node: Node, labels: tuple[str, ...], heads: int, width: int, inner: str, core_sizes: list
) -> tuple[str, ...] | str:
    """Labels after ``node`` splits the channel axis into (heads, width), or a reason."""
    merged = "c" if inner == "d" else "m"
    before, after = _shape(node.args[0]), _shape(node)
    if merged not in labels:
        return "the heads are split from an axis that is not the projection's channels"
    k = labels.index(merged)
    if after != (*before[:k], heads, width, *before[k + 1 :]):
        return "the projection's channels are not split into (heads, width)"
    if _is(node, {"flatten", torch.flatten}):
        return "a flatten cannot split"
    _, sizes = _size_args(node)
    position = 1 if node.target == "unflatten" else k + 1
    if position >= len(sizes) or not isinstance(sizes[position], int):
        return "the head width is computed in the graph, not a literal size"
    if sizes[position] != -1:
        core_sizes.append((node, position, inner))
    return (*labels[:k], "h", inner, *labels[k + 1 :])


def _unchanged(node: Node, labels: tuple[str, ...], core_sizes: list) -> tuple[str, ...] | None:
    """A reshape to the shape its input has (as ``torch.export`` writes ``contiguous``):
    the labels stay, and literal widths among its sizes are recorded to rewrite."""
    if _is(node, _MOVES) or _shape(node) != _shape(node.args[0]) or node.target == "unflatten":
        return None
    _, sizes = _size_args(node)
    if len(sizes) != len(labels):
        return None
    for position, (size, label) in enumerate(zip(sizes, labels, strict=True)):
        if label in ("d", "e", "c", "m") and isinstance(size, int) and size != -1:
            core_sizes.append((node, position, label))
    return labels


def _merge(node: Node, labels: tuple[str, ...], core_sizes: list, last: bool) -> tuple | str:
    """Labels after ``node`` merges (heads, value width) back into one axis, or a reason."""
    before, after = _shape(node.args[0]), _shape(node)
    if "h" not in labels or labels.index("h") + 1 >= len(labels):
        return "the heads are not merged with the value width"
    k = labels.index("h")
    if labels[k + 1] != "e" or after != (*before[:k], before[k] * before[k + 1], *before[k + 2 :]):
        return "the heads are not merged with the value width"
    if not _is(node, {"flatten", torch.flatten}):
        _, sizes = _size_args(node)
        if k >= len(sizes) or not isinstance(sizes[k], int):
            return "the merged width is computed in the graph, not a literal size"
        if sizes[k] != -1 and not last:  # the last node's sizes follow its pruned span
            core_sizes.append((node, k, "m"))
    return (*labels[:k], "m", *labels[k + 2 :])


def _backward(
    sdpa: Node, start: Node, heads: int, width: int, inner: str, core: AttentionCore
) -> Node | str:
    """Follow one attention input back to its projection; record the absorbed nodes."""
    chain, node = [], start
    while _is(node, _MOVES | _RESHAPES) and isinstance(node.args[0], Node):
        chain.insert(0, node)
        node = node.args[0]
    shape = _shape(node)
    if not chain or shape is None:
        return "the attention input is not a reshaped projection"
    labels = (*(f"a{i}" for i in range(len(shape) - 1)), "c" if inner == "d" else "m")
    for i, step in enumerate(chain):
        later = chain[i + 1] if i + 1 < len(chain) else None
        users = set(step.users) - {later, sdpa}
        if any(not (u.op == "call_function" and u.target is merge_masks) for u in users):
            return f"'{step.name}' is also used outside the attention"
        if _is(step, _MOVES):
            labels = _move(step, labels)
        elif (same := _unchanged(step, labels, core.sizes)) is not None:
            labels = same
        else:
            labels = _split(step, labels, heads, width, inner, core.sizes)
            if isinstance(labels, str):
                return labels
        core.labels[step.name] = labels
    if labels[-1] != inner or labels[-3] != "h":
        return "the heads and widths are not in the (batch, heads, length, width) layout"
    return node


def _forward(sdpa: Node, labels: tuple[str, ...], core: AttentionCore) -> Node | str:
    """Follow the attention's output to where the heads are merged; record the chain."""
    node, merged = sdpa, False
    core.labels[sdpa.name] = labels
    while True:
        users = list(node.users)
        step = users[0] if len(users) == 1 else None
        if step is None or not _is(step, _MOVES | _RESHAPES) or step.args[0] is not node:
            break
        if merged and not _is(step, _MOVES):
            break
        if _is(step, _MOVES):
            labels = _move(step, labels)
        elif (same := _unchanged(step, labels, core.sizes)) is not None:
            labels = same
        else:
            last = not any(_is(u, _MOVES) for u in step.users)
            labels = _merge(step, labels, core.sizes, last)
            if isinstance(labels, str):
                return labels
            merged = True
        core.labels[step.name] = labels
        node = step
    if not merged or labels[-1] != "m":
        return "the attention's output heads are not merged back into its last axis"
    del core.labels[node.name]  # the merged value is an ordinary one, with its own span
    return node


def _attention(sdpa: Node) -> AttentionCore | str:
    q, k, v = (sdpa.args[i] if len(sdpa.args) > i else None for i in range(3))
    if not all(isinstance(x, Node) for x in (q, k, v)):
        return "query, key and value must be graph values"
    q_shape, k_shape, v_shape = _shape(q), _shape(k), _shape(v)
    if q_shape is None or k_shape is None or v_shape is None or len(q_shape) != 4:
        return "the attention is not over (batch, heads, length, width) values"
    heads, qk_dim, v_dim = q_shape[1], q_shape[-1], v_shape[-1]
    if k_shape[1] != heads or v_shape[1] != heads or k_shape[-1] != qk_dim:
        return "query, key and value do not share heads and widths"
    core = AttentionCore(sdpa, q, k, v, sdpa, heads, qk_dim, v_dim)
    found = []
    for value, width, inner in ((q, qk_dim, "d"), (k, qk_dim, "d"), (v, v_dim, "e")):
        source = _backward(sdpa, value, heads, width, inner, core)
        if isinstance(source, str):
            return source
        found.append(source)
    if len({id(n) for n in found}) != 3:
        return "query, key and value come from one projection"
    out = _forward(sdpa, (*core.labels[q.name][:-1], "e"), core)
    if isinstance(out, str):
        return out
    core.q, core.k, core.v, core.out = *found, out
    return core


def find_attention(gm: GraphModule) -> tuple[list[AttentionCore], dict[str, str]]:
    """Every ``scaled_dot_product_attention`` whose projections can prune together, and,
    for the others, the reason by node name (module docstring)."""
    cores, refusals = [], {}
    for node in gm.graph.find_nodes(op="call_function", target=F.scaled_dot_product_attention):
        found = _attention(node)
        if isinstance(found, str):
            refusals[node.name] = f"attention: {found}"
        else:
            cores.append(found)
    return cores, refusals


def is_mask_builder(node: Node) -> bool:
    """Whether ``node`` builds an attention mask, reading only the batch and head counts
    of the queries it is given (not their widths)."""
    return node.op == "call_function" and node.target is merge_masks
