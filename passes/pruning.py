"""Channel pruning: remove whole channel sets from every layer they pass through.

``Conv(x)[C] -> Conv'(x)[C - k]`` and every consumer with it: the channel dependency graph
(``fxcomp.channels``) says which channels are tied; in each prunable group the channel sets
with the lowest importance are removed, and Conv, Linear, BatchNorm and GroupNorm
parameters, buffers and attributes are sliced for real, ``split`` sizes and the sizes a
``view``/``reshape`` bakes into the graph are rewritten. The result is an ordinary smaller
model. Groups that touch the model's inputs or outputs, or an op the graph does not know,
keep all their channels.

Importance of a channel set sums, over every weight that carries one of its channels
(producer rows and bias, BatchNorm/GroupNorm scale and shift, consumer columns):
``"l2"`` |w|^2, ``"l1"`` |w|, ``"taylor"`` |w * dL/dw| on ``data`` (first order), or
``"bn_scale"`` |gamma| of the group's BatchNorms (``"l2"`` where a group has none);
``"random"`` is seeded. ``scope="local"`` removes ``ratio`` of every group;
``scope="global"`` ranks all channel sets together (scores divided by their group's mean)
and removes ``ratio`` of them all.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from fxcomp.channel_report import importance_figure, layer_table, merge_tables
from fxcomp.channels import ChannelGraph, Group
from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.fused import weighted_layer
from fxcomp.graph import BATCHNORMS, module_of
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.trace import tensor_metadata

__all__ = [
    "KEPT_CHANNELS",
    "GroupPlan",
    "Plan",
    "PruneOptions",
    "prune",
    "prune_channels",
    "pruning_plan",
    "zero_channels",
]

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "random")


@dataclass(frozen=True)
class PruneOptions:
    """How much to prune, where, and how to rank channels (see ``prune``)."""

    ratio: float = 0.5
    importance: str = "l2"
    scope: str = "local"
    ignore: tuple[str, ...] = ()
    ratios: Mapping[str, float] = field(default_factory=dict)
    round_to: int | None = None
    min_channels: int = 1
    seed: int = 0
    data: Iterable[Any] | None = None
    loss: Callable[[Any, Any], torch.Tensor] = F.cross_entropy

    def check(self) -> None:
        """Raise ``InputError`` naming the option that cannot be used."""
        for name, ratio in {"ratio": self.ratio, **self.ratios}.items():
            if not 0 <= ratio < 1:
                raise InputError(f"prune ratio must be in [0, 1), got {ratio} for {name}")
        if self.importance not in IMPORTANCES:
            raise InputError(
                f"unknown importance '{self.importance}'", hint=f"use {', '.join(IMPORTANCES)}"
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


def _modules(gm: GraphModule) -> dict[str, nn.Module]:
    """Every node's module by node name (``call_module`` nodes only)."""
    return {n.name: module_of(gm, n) for n in gm.graph.find_nodes(op="call_module")}


def _carriers(modules: dict[str, nn.Module], node: Node) -> list[Carrier]:
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
    """Element scores of a tensor (|w|^2, |w| or |w * grad|) summed over all but its first
    two axes; each tensor is measured once per plan."""

    def __init__(self, importance: str) -> None:
        self.importance = importance
        self.done: dict[int, torch.Tensor] = {}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self.done:
            t = tensor.detach()
            if self.importance == "l1":
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


def _value_scores(
    modules: dict[str, nn.Module], node: Node, measure: _Measure
) -> torch.Tensor | None:
    """Per channel of ``node``'s value: ``measure`` summed over every weight carrying it."""
    scores = [c.per_channel(measure(c.tensor)) for c in _carriers(modules, node)]
    return torch.stack(scores).sum(0) if scores else None


class _Scorer:
    """The importance of every channel set of a group (module docstring)."""

    def __init__(self, gm: GraphModule, options: PruneOptions) -> None:
        self.importance = options.importance
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.modules = _modules(gm)
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
    graph = ChannelGraph.build(gm)
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
    nodes, modules = {n.name: n for n in gm.graph.nodes}, _modules(gm)
    with torch.no_grad():
        for value, channels in plan.removed().items():
            for carrier in _carriers(modules, nodes[value]):
                carrier.zero(channels)


def _slice_layer(layer: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    """Slice a Conv or Linear in place to the kept input and output channels."""
    weight = layer.weight.data
    groups = getattr(layer, "groups", 1)
    per_in = weight.shape[1]
    if len(keep_out) == weight.shape[0] and len(keep_in) == per_in * groups:
        return  # nothing removed
    weight = weight.index_select(0, keep_out)
    if len(keep_in) == per_in * groups:
        pass  # no input channel removed
    elif groups == 1:
        weight = weight.index_select(1, keep_in)
    elif per_in > 1:  # grouped: every group kept the same within-group channels
        weight = weight.index_select(1, keep_in[keep_in < per_in])
    layer.weight.data = weight
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.index_select(0, keep_out)
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape[0], weight.shape[1]
        return
    if groups > 1 and per_in == 1:  # depthwise: one group per kept input channel
        layer.groups = len(keep_in)
    layer.out_channels, layer.in_channels = weight.shape[0], len(keep_in)


def _slice_norm(module: nn.Module, keep: torch.Tensor) -> None:
    """Slice a BatchNorm or GroupNorm in place to the kept channels."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(module, name, None)
        if tensor is not None:
            tensor.data = tensor.data.index_select(0, keep)
    if isinstance(module, nn.GroupNorm):
        per_group = module.num_channels // module.num_groups
        module.num_channels, module.num_groups = len(keep), len(keep) // per_group
    else:
        module.num_features = len(keep)


class _Kept:
    """The channels of each value that remain once ``plan`` is applied."""

    def __init__(self, plan: Plan) -> None:
        self.spans = plan.graph.spans
        self.gone = plan.removed()
        self.known: dict[tuple[str, int | None], torch.Tensor] = {}

    def __call__(self, value: Node, size: int | None = None) -> torch.Tensor:
        """The kept channels of ``value`` (all ``size`` when it loses none)."""
        key = (value.name, size)
        if key not in self.known:
            if value.name not in self.gone:
                whole = self.spans[value.name].size if size is None else size
                self.known[key] = torch.arange(whole)
            else:
                keep = torch.ones(self.spans[value.name].size, dtype=torch.bool)
                keep[self.gone[value.name]] = False
                self.known[key] = keep.nonzero().flatten()
        return self.known[key]

    def shape(self, value: Node) -> list[int]:
        """``value``'s shape once pruned."""
        shape = list(value.meta["tensor_meta"].shape)
        span = self.spans.get(value.name)
        if span is not None and value.name in self.gone:
            shape[span.axis : span.axis + len(span.dims)] = span.shrunk(len(self(value)))
        return shape


def _rewrite_split(node: Node, plan: Plan, kept: _Kept) -> None:
    """Give a ``split``/``chunk`` on the channel axis its pruned piece sizes."""
    split = plan.graph.splits[node.name]
    span = plan.graph.spans[split.source.name]
    if split.dim != span.axis or split.source.name not in kept.gone:
        return
    left = kept(split.source)
    bounds = torch.tensor(split.sizes).cumsum(0)
    sizes = torch.bincount(torch.bucketize(left, bounds, right=True), minlength=len(bounds))
    node.target = torch.split if node.op == "call_function" else "split"
    node.args, node.kwargs = (split.source, sizes.tolist()), {"dim": split.dim}


def _rewrite_view(node: Node, kept: _Kept) -> None:
    """Rewrite the literal sizes a ``view``/``reshape`` bakes in to the pruned shape."""
    new = kept.shape(node)
    packed = len(node.args) == 2 and isinstance(node.args[1], list | tuple)
    sizes = list(node.args[1] if packed else node.args[1:])
    if len(sizes) != len(new):
        return
    sizes = [n if isinstance(s, int) and s != -1 else s for s, n in zip(sizes, new, strict=True)]
    node.args = (node.args[0], sizes) if packed else (node.args[0], *sizes)


def _shrink_meta(node: Node, plan: Plan, kept: _Kept) -> None:
    """Give ``node`` the ``tensor_meta`` of its pruned value: only values that lose channels
    (and the pieces of a split of one) change shape, along their channel axes."""
    meta = node.meta.get("tensor_meta")
    split = plan.graph.splits.get(node.name)
    if node.name in kept.gone and isinstance(meta, TensorMetadata):
        value = torch.empty(kept.shape(node), dtype=meta.dtype, device="meta")
        node.meta["tensor_meta"] = tensor_metadata(value)
    elif split is not None and split.source.name in kept.gone:
        dtype = split.source.meta["tensor_meta"].dtype
        source = torch.empty(kept.shape(split.source), dtype=dtype, device="meta")
        sizes = node.args[1] if isinstance(node.args[1], list) else list(split.sizes)
        node.meta["tensor_meta"] = tensor_metadata(tuple(source.split(sizes, split.dim)))


KEPT_CHANNELS = "fxcomp_kept_channels"


def _record_kept(gm: GraphModule, kept: _Kept) -> None:
    """Note in ``gm.meta[KEPT_CHANNELS]``, per value that loses channels on one axis, that
    axis and which of its original channels remain (over every round of pruning), so that
    distillation can compare a pruned layer with the teacher's kept channels."""
    record = gm.meta.setdefault(KEPT_CHANNELS, {})
    for node in gm.graph.nodes:
        span = kept.spans.get(node.name)
        if node.name not in kept.gone or span is None:
            continue
        if len(span.dims) != 1:
            record.pop(node.name, None)
            continue
        before = record.get(node.name, (span.axis, list(range(span.size))))[1]
        record[node.name] = (span.axis, [before[i] for i in kept(node).tolist()])


def _apply(gm: GraphModule, plan: Plan) -> None:
    """Slice every layer, rewrite every baked size and every changed shape for the planned
    removals."""
    kept = _Kept(plan)
    _record_kept(gm, kept)
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        layer = weighted_layer(module)
        if layer is not None:
            inputs = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            outputs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            _slice_layer(layer, kept(node.args[0], inputs), kept(node, outputs))
        elif (type(module) in BATCHNORMS or isinstance(module, nn.GroupNorm)) and (
            node.name in kept.gone
        ):
            _slice_norm(module, kept(node))
        elif node.name in plan.graph.splits:
            _rewrite_split(node, plan, kept)
        elif node.name in plan.graph.spans and node.target in ("view", "reshape", torch.reshape):
            _rewrite_view(node, kept)
        _shrink_meta(node, plan, kept)
    for core in plan.graph.attention.values():
        if core.q.name in kept.gone or core.v.name in kept.gone:
            core.resize(gm, len(kept(core.q)) // core.heads, len(kept(core.v)) // core.heads)
    gm.graph.lint()


def prune_channels(
    gm: GraphModule,
    ctx: CompileContext,
    *,
    options: PruneOptions = PruneOptions(),
    steps: int = 1,
    between_steps: Callable[[GraphModule, int], None] | None = None,
) -> PassResult:
    """Remove the planned channel sets from every layer, in ``steps`` rounds (module doc)."""
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"prune steps must be a positive integer, got {steps!r}")
    modified = False
    for step in range(1, steps + 1):
        plan = pruning_plan(gm, _step_options(options, step, steps))
        if step == 1:
            ctx.figures["prune_importance"] = functools.partial(importance_figure, plan)
            before = layer_table(gm, plan)
        if any(p.removed for p in plan.plans):
            _apply(gm, plan)
            modified = True
        if between_steps is not None and step < steps:
            gm.recompile()
            between_steps(gm, step)
    ctx.report.tables["prune"] = merge_tables(before, layer_table(gm, None))
    return PassResult(gm, modified=modified)


def _step_options(options: PruneOptions, step: int, steps: int) -> PruneOptions:
    """The share of what is left that round ``step`` of ``steps`` removes, so that the
    rounds together remove ``ratio`` of the original channels."""

    def share(ratio: float) -> float:
        done, target = ratio * (step - 1) / steps, ratio * step / steps
        return (target - done) / (1 - done)

    ratios = {name: share(r) for name, r in options.ratios.items()}
    return replace(options, ratio=share(options.ratio), ratios=ratios)


def prune(
    ratio: float = 0.5,
    *,
    importance: str = "l2",
    scope: str = "local",
    ignore: Sequence[str] = (),
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    steps: int = 1,
    min_channels: int = 1,
    data: Iterable[Any] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    between_steps: Callable[[GraphModule, int], None] | None = None,
    seed: int = 0,
) -> Pass:
    """Remove ``ratio`` of the channels of every prunable group, ranked by ``importance``.

    ``ignore`` and the keys of ``ratios`` are module or node names, shell patterns allowed
    (``"layer4.*"``): a group with an ignored member keeps its channels, a group with a
    member named in ``ratios`` loses that share instead. ``round_to`` keeps channel counts
    multiples of N. ``steps`` prunes in rounds, re-ranking after each and calling
    ``between_steps(gm, step)`` (fine-tune there). ``data`` (batches of ``(inputs,
    targets)``) and ``loss`` feed the ``"taylor"`` importance.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.prune(0.5, ignore=["layer4.*"])])
    """
    options = PruneOptions(
        ratio,
        importance,
        scope,
        tuple(ignore),
        dict(ratios or {}),
        round_to,
        min_channels,
        seed,
        data,
        loss,
    )

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return prune_channels(gm, ctx, options=options, steps=steps, between_steps=between_steps)

    return Pass("prune", run, run_before=("quantize", "qat"))
