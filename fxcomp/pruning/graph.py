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
do the model's inputs and outputs. How each op ties channels is a table of rules
(``fxcomp.pruning.rules``); a caller's own rules teach it ops it does not know.

Example::

    graph = ChannelGraph.build(gm)
    for group in graph.groups():
        summary = (group.values, len(group.channel_sets), group.blocked_by)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.fx import GraphModule, Node

from fxcomp.pruning.attention import AttentionCore, find_attention, is_mask_builder
from fxcomp.pruning.rules import ChannelRule, rule_for
from fxcomp.pruning.ties import ChannelTies, Group, Span, shape_of

__all__ = ["ChannelGraph"]


class ChannelGraph(ChannelTies):
    """Channel-level dependencies of a traced graph with shapes; see the module docstring."""

    def __init__(self, gm: GraphModule, rules: Mapping[Any, ChannelRule] | None = None) -> None:
        super().__init__(gm)
        self.rules = dict(rules or {})
        cores, self.attention_refusals = find_attention(gm)
        self.attention = {core.out.name: core for core in cores}  # by merged output
        self.absorbed = {name for core in cores for name in core.labels}

    @classmethod
    def build(cls, gm: GraphModule, rules: Mapping[Any, ChannelRule] | None = None) -> ChannelGraph:
        """Build the graph for ``gm`` (its nodes must carry ``tensor_meta``), with ``rules``
        (``fxcomp.pruning.rules``) for ops the built-in rules do not know."""
        self = cls(gm, rules)
        for node in gm.graph.nodes:
            if node.name in self.attention:
                self._attend(node, self.attention[node.name])
            elif node.name not in self.absorbed:
                self._couple(node)
        return self

    def _couple(self, node: Node) -> None:
        shape = shape_of(node)
        if node.op == "placeholder":
            if shape and len(shape) >= 2:
                self.claim(node, Span(1, (shape[1],)))
                self.block(node, [node], "model input")
            return
        inputs = [n for n in node.all_input_nodes if shape_of(n) or n.name in self.splits]
        if node.op == "output":
            self.block(node, inputs, "model output")
            return
        if node.op == "get_attr" or not (inputs or shape):
            return
        reason = self._dispatch(node)
        if reason is None:
            return
        if shape and len(shape) >= 2 and node.name not in self.spans:
            self.claim(node, self._guess(inputs, shape))
        self.block(node, [*inputs, node], reason)

    def _guess(self, inputs: list[Node], shape: tuple[int, ...]) -> Span:
        """A blocked op's output channels (so that what follows is tied to the blocked
        group): on its first input's channel axis if it has as many axes, else axis 1."""
        for value in inputs:
            span = self.spans.get(value.name)
            if span is not None and len(shape_of(value)) == len(shape):
                return span if shape_of(value) == shape else Span(span.axis, (shape[span.axis],))
        return Span(1, (shape[1],))

    def _dispatch(self, node: Node) -> str | None:
        """Tie ``node``'s channels to its inputs' by its rule; the reason to block them when
        it cannot, or when no rule knows the op."""
        rule = rule_for(self, node, self.rules)
        if rule is not None:
            return rule(self, node)
        if is_mask_builder(node):
            return None  # builds an attention mask from sizes
        if node.name in self.attention_refusals:
            return self.attention_refusals[node.name]
        return f"{self.describe(node)} is not known to prune"

    def _attend(self, out: Node, core: AttentionCore) -> None:
        """Tie the query and key projections' channels, and the value projection's to the
        merged output's, one within-head dimension of every head at a time
        (``fxcomp.pruning.attention``)."""
        values = (core.q, core.k, core.v)
        spans = [self.spans.get(v.name) for v in values]
        last = [Span(len(shape_of(v)) - 1, (shape_of(v)[-1],)) for v in values]
        shape = shape_of(out)
        self.claim(out, Span(len(shape) - 1, (shape[-1],)))
        if spans != last:
            self.block(out, [*values, out], "attention over unknown channels")
            return
        self.same(core.q, core.k)
        self.tie(core.q, torch.arange(core.heads * core.qk_dim).view(core.heads, -1))
        self.same(core.v, out)
        self.tie(core.v, torch.arange(core.heads * core.v_dim).view(core.heads, -1))

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
