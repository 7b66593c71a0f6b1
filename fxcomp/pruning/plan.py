"""The pruning plan: which channel sets of each prunable group go, by importance.

The channel dependency graph (``fxcomp.pruning.graph``) says which channels are tied; in each
prunable group the channel sets with the lowest importance are chosen. Importance of a
channel set sums, over every weight that carries one of its channels (producer rows and
bias, BatchNorm/GroupNorm scale and shift, consumer columns): ``"l2"`` |w|^2, ``"l1"`` |w|,
``"taylor"`` |w * dL/dw| on ``data`` (first order), ``"bn_scale"`` |gamma| of the group's
BatchNorms (``"l2"`` where a group has none), ``"random"`` (seeded), or a callable that maps
a weight tensor to per-element scores of its shape (``lambda w: w.abs() ** 3``; the
parameter itself is given, so its ``.grad`` is there to read). ``scope="local"`` removes
``ratio`` of every group; ``scope="global"`` ranks all channel sets together (scores
divided by their group's mean) and removes ``ratio`` of them all. Groups that touch the
model's inputs or outputs, or an op the graph does not know, keep all their channels.

Example::

    plan = pruning_plan(gm, PruneOptions(0.5, importance="l1"))
    removed = plan.removed()       # value -> channels that go
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import BATCHNORMS, module_of
from fxcomp.nn.fused import weighted_layer
from fxcomp.pruning.graph import ChannelGraph, Group
from fxcomp.pruning.rules import ChannelRule

__all__ = [
    "IMPORTANCES",
    "Carrier",
    "GroupPlan",
    "Importance",
    "Plan",
    "PruneOptions",
    "carriers",
    "modules_by_node",
    "pruning_plan",
    "zero_channels",
]

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "random")
# a weight tensor (the parameter itself) -> a score per element, of the same shape
Importance = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PruneOptions:
    """How much to prune, where, how to rank channels, in how many rounds, and the channel
    rules beyond the built-in ones (see ``fxcomp.passes.prune``)."""

    ratio: float = 0.5
    importance: str | Importance = "l2"
    scope: str = "local"
    ignore: tuple[str, ...] = ()
    ratios: Mapping[str, float] = field(default_factory=dict)
    round_to: int | None = None
    min_channels: int = 1
    seed: int = 0
    data: Iterable[Any] | None = None
    loss: Callable[[Any, Any], torch.Tensor] = F.cross_entropy
    steps: int = 1
    between_steps: Callable[[GraphModule, int], None] | None = None
    channel_rules: Mapping[Any, ChannelRule] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``InputError`` naming the option that cannot be used."""
        for name, ratio in {"ratio": self.ratio, **self.ratios}.items():
            if not 0 <= ratio < 1:
                raise InputError(f"prune ratio must be in [0, 1), got {ratio} for {name}")
        if not callable(self.importance) and self.importance not in IMPORTANCES:
            raise InputError(
                f"unknown importance '{self.importance}'",
                hint=f"use {', '.join(IMPORTANCES)}, or a function weight -> element scores",
            )
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"prune steps must be a positive integer, got {self.steps!r}")
        for target, rule in self.channel_rules.items():
            if not callable(rule):
                raise InputError(
                    f"the channel rule for {target!r} is a {type(rule).__name__}, not a function",
                    hint="a rule is rule(graph, node) -> None, or the reason to block",
                )
        if self.scope not in ("local", "global"):
            raise InputError(f"unknown scope '{self.scope}'", hint="use local or global")
        if self.importance == "taylor" and self.data is None:
            raise InputError(
                "taylor importance needs data",
                hint="pass data=[(inputs, targets), ...] for the gradients of loss(model(x), y)",
            )


@dataclass(frozen=True)
class Carrier:
    """A weight that carries a value's channels along ``axis``; a grouped convolution's
    weight carries its input channel ``c`` in the rows of group ``c // per_group`` only."""

    tensor: torch.Tensor
    axis: int
    groups: int = 1

    def per_channel(self, reduced: torch.Tensor) -> torch.Tensor:
        """Per channel, the sum of ``reduced``: the tensor's element scores summed over
        everything but its first two axes (see ``_Measure``)."""
        if reduced.dim() == 1:
            return reduced.double()
        if self.groups == 1:
            return reduced.sum(1 - self.axis).double()
        rows, per_group = reduced.shape
        blocks = reduced.reshape(self.groups, rows // self.groups, per_group)
        return blocks.sum(1).double().reshape(-1)

    def zero(self, channels: torch.Tensor) -> None:
        """Zero what carries ``channels``, in place."""
        if self.groups == 1:
            self.tensor.index_fill_(self.axis, channels, 0)
            return
        per_group = self.tensor.shape[1]
        blocks = self.tensor.view(self.groups, -1, per_group, *self.tensor.shape[2:])
        for channel in channels.tolist():
            blocks[channel // per_group, :, channel % per_group].zero_()


def modules_by_node(gm: GraphModule) -> dict[str, nn.Module]:
    """Every node's module by node name (``call_module`` nodes only)."""
    return {n.name: module_of(gm, n) for n in gm.graph.find_nodes(op="call_module")}


def carriers(modules: dict[str, nn.Module], node: Node) -> list[Carrier]:
    """The parameters that carry the channels of ``node``'s value: producer rows and bias,
    BatchNorm/GroupNorm scale and shift, consumer columns."""
    found = []
    module = modules.get(node.name)
    layer = weighted_layer(module)
    if layer is not None:
        found += [Carrier(t, 0) for t in (layer.weight, layer.bias) if t is not None]
    elif (type(module) in BATCHNORMS or isinstance(module, nn.GroupNorm)) and module.affine:
        found += [Carrier(module.weight, 0), Carrier(module.bias, 0)]
    for user in node.users:
        consumer = weighted_layer(modules.get(user.name))
        if consumer is None or user.args[0] is not node:
            continue
        groups = getattr(consumer, "groups", 1)
        if groups == 1:
            found.append(Carrier(consumer.weight, 1))
        elif consumer.in_channels // groups > 1:  # depthwise: the output rows carry them
            found.append(Carrier(consumer.weight, 1, groups))
    return found


@dataclass
class GroupPlan:
    """One prunable group: its channel sets' scores and which of them go."""

    group: Group
    ratio: float
    scores: list[float]
    fixed: bool = False  # its ratio comes from ``ratios``: global ranking leaves it alone
    removed: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """The channel graph, every group, the prunable ones' plans, and the channel sets cut."""

    graph: ChannelGraph
    groups: list[Group]
    plans: list[GroupPlan]

    def removed(self) -> dict[str, torch.Tensor]:
        """The channels removed from each value, in order (values that lose none left out)."""
        found = {}
        for plan in self.plans:
            cut = torch.zeros(plan.group.sets, dtype=torch.bool)
            cut[plan.removed] = True
            for value, labels in plan.group.members.items():
                channels = cut[labels].nonzero().flatten()
                if len(channels):
                    found[value] = channels
        return found


def _matches(patterns: Iterable[str], gm: GraphModule, nodes: dict[str, Node], value: str):
    node = nodes[value]
    names = {value, node.target} if node.op == "call_module" else {value}
    return next((p for p in patterns for n in names if fnmatch.fnmatchcase(str(n), p)), None)


class _Measure:
    """Element scores of a tensor (|w|^2, |w|, |w * grad| or the user's function) summed
    over all but its first two axes; each tensor is measured once per plan."""

    def __init__(self, importance: str | Importance) -> None:
        self.importance = importance
        self.done: dict[int, torch.Tensor] = {}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self.done:
            t = tensor.detach()
            if callable(self.importance):
                scores = _scores_of(self.importance, tensor)
            elif self.importance == "l1":
                scores = t.abs()
            elif self.importance == "taylor":
                grad = tensor.grad if tensor.grad is not None else torch.zeros_like(t)
                scores = (t * grad).abs()
            else:
                scores = t * t
            if t.dim() > 2:
                scores = scores.reshape(t.shape[0], t.shape[1], -1).sum(-1)
            self.done[id(tensor)] = scores
        return self.done[id(tensor)]


def _scores_of(importance: Importance, tensor: torch.Tensor) -> torch.Tensor:
    """The user's element scores of ``tensor``, checked: one finite float per element."""
    with torch.no_grad():
        scores = importance(tensor)
    if not isinstance(scores, torch.Tensor) or scores.shape != tensor.shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InputError(
            f"the importance function gave {got} for a weight of shape {tuple(tensor.shape)}",
            hint="return one score per element, e.g. lambda w: w.abs() ** 3",
        )
    if not torch.isfinite(scores).all():
        raise InputError("the importance function gave scores that are not finite")
    return scores.detach().double()


def _value_scores(
    modules: dict[str, nn.Module], node: Node, measure: _Measure
) -> torch.Tensor | None:
    """Per channel of ``node``'s value: ``measure`` summed over every weight carrying it."""
    scores = [c.per_channel(measure(c.tensor)) for c in carriers(modules, node)]
    return torch.stack(scores).sum(0) if scores else None


class _Scorer:
    """The importance of every channel set of a group (module docstring)."""

    def __init__(self, gm: GraphModule, options: PruneOptions) -> None:
        self.importance = options.importance
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.modules = modules_by_node(gm)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.measure = _Measure("l2" if options.importance == "bn_scale" else options.importance)

    def __call__(self, group: Group) -> list[float]:
        if self.importance == "random":
            return torch.rand(group.sets, generator=self.generator).tolist()
        if self.importance == "bn_scale":
            gammas = {
                v: self.modules[v].weight.detach().abs().double()
                for v in group.values
                if type(self.modules.get(v)) in BATCHNORMS and self.modules[v].affine
            }
            if gammas:
                return _set_scores(group, gammas)
        scores = {v: _value_scores(self.modules, self.nodes[v], self.measure) for v in group.values}
        return _set_scores(group, {v: s for v, s in scores.items() if s is not None})


def _set_scores(group: Group, per_value: dict[str, torch.Tensor]) -> list[float]:
    total = torch.zeros(group.sets, dtype=torch.float64)
    for value, scores in per_value.items():
        total.index_add_(0, group.members[value], scores)
    return total.tolist()


def _taylor_gradients(gm: GraphModule, options: PruneOptions) -> None:
    """Accumulate d loss / d w over ``options.data`` into every parameter's ``grad``."""
    gm.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for inputs, targets in options.data:
            inputs = inputs if isinstance(inputs, tuple | list) else (inputs,)
            options.loss(gm(*inputs), targets).backward()


def pruning_plan(gm: GraphModule, options: PruneOptions) -> Plan:
    """The groups of ``gm`` and the channel sets ``options`` removes from them."""
    options.check()
    graph = ChannelGraph.build(gm, options.channel_rules)
    groups = graph.groups()
    nodes = {n.name: n for n in gm.graph.nodes}
    if options.importance == "taylor":
        _taylor_gradients(gm, options)
    scorer = _Scorer(gm, options)
    plans = []
    for group in groups:
        if not group.prunable or any(_matches(options.ignore, gm, nodes, v) for v in group.values):
            continue
        pattern = next(
            (p for v in group.values if (p := _matches(options.ratios, gm, nodes, v))), None
        )
        ratio = options.ratios[pattern] if pattern else options.ratio
        plans.append(GroupPlan(group, ratio, scorer(group), fixed=pattern is not None))
    if options.importance == "taylor":
        gm.zero_grad(set_to_none=True)
    counts = _global_counts(plans, options) if options.scope == "global" else None
    for i, plan in enumerate(plans):
        total = plan.group.sets
        count = counts[i] if counts else _share(total, plan.ratio)
        keep = max(options.min_channels, total - count)
        if options.round_to:
            keep = max(options.round_to, round(keep / options.round_to) * options.round_to)
        keep = min(keep, total)
        floor_ratio = plan.ratio if counts is None else 1.0
        plan.removed = _lowest(plan, total - keep, nodes, graph, floor_ratio, options)
    return Plan(graph, groups, plans)


def _share(count: int, ratio: float) -> int:
    """``floor(count * ratio)``, safe from float error (0.29 * 100 is 28.999...)."""
    return math.floor(count * ratio + 1e-9)


def _global_counts(plans: list[GroupPlan], options: PruneOptions) -> list[int]:
    """How many channel sets each group loses when all are ranked together, scores divided
    by their group's mean (groups named in ``ratios`` keep their own share)."""
    ranked = []
    for i, plan in enumerate(plans):
        if not plan.fixed:
            mean = sum(plan.scores) / len(plan.scores) or 1.0
            ranked += [(score / mean, i) for score in plan.scores]
    counts = [_share(len(p.scores), p.ratio) if p.fixed else 0 for p in plans]
    for _, i in sorted(ranked)[: _share(len(ranked), options.ratio)]:
        counts[i] += 1
    return counts


def _lowest(
    plan: GroupPlan,
    count: int,
    nodes: dict[str, Node],
    graph: ChannelGraph,
    ratio: float,
    options: PruneOptions,
) -> list[int]:
    """Up to ``count`` lowest-scoring channel sets whose removal leaves every value of the group
    at least its share: a ``cat`` ties several layers into one group, and each keeps
    ``1 - ratio`` of its own channels."""
    group = plan.group
    counts = torch.stack(
        [torch.bincount(group.members[v], minlength=group.sets) for v in group.values]
    )
    left = counts.sum(1)
    floor = torch.clamp(left - torch.floor(left * ratio + 1e-9).long(), min=options.min_channels)
    order = sorted(range(group.sets), key=plan.scores.__getitem__)
    if bool((counts == counts[:, :1]).all()):  # every set holds the same channels of each value
        room = int(((left - floor) // counts[:, 0].clamp(min=1)).min())
        return sorted(order[: min(count, room)])
    chosen = []
    for i in order:
        if len(chosen) == count:
            break
        if bool((left - counts[:, i] >= floor).all()):
            left -= counts[:, i]
            chosen.append(i)
    return sorted(chosen)


def zero_channels(gm: GraphModule, plan: Plan) -> None:
    """Zero every parameter slice of the planned channels (the exactness oracle's model)."""
    nodes, modules = {n.name: n for n in gm.graph.nodes}, modules_by_node(gm)
    with torch.no_grad():
        for value, channels in plan.removed().items():
            for carrier in carriers(modules, nodes[value]):
                carrier.zero(channels)
