"""Applying a pruning plan: every layer a removed channel passes through is sliced for real.

``Conv(x)[C] -> Conv'(x)[C - k]`` and every consumer with it: Conv, Linear, BatchNorm and
GroupNorm parameters, buffers and attributes are sliced, ``split`` sizes and the sizes a
``view``/``reshape`` bakes into the graph are rewritten, attention keeps its heads' widths
and scale. The result is an ordinary smaller model. Which of the original channels each
pruned value keeps is recorded in the graph slot ``KEPT_CHANNELS`` (over every round), so
that distillation can compare a pruned layer with the teacher's kept channels.

Example::

    result = prune_channels(gm, ctx, options=PruneOptions(0.5, steps=2))
    KEPT_CHANNELS.get(gm)["conv1"]      # (1, [0, 3, 4, ...])
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from fxcomp.ir.graph import BATCHNORMS, module_of
from fxcomp.ir.meta import GraphSlot
from fxcomp.ir.trace import tensor_metadata
from fxcomp.nn.fused import weighted_layer
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.pruning.plan import Plan, PruneOptions, pruning_plan
from fxcomp.pruning.report import importance_figure, layer_table, merge_tables

__all__ = ["KEPT_CHANNELS", "apply_plan", "prune_channels"]


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


KEPT_CHANNELS: GraphSlot[dict] = GraphSlot(
    "fxcomp:kept_channels",
    dict,
    "per value that lost channels on one axis: (axis, the original channels it keeps)",
)


def _record_kept(gm: GraphModule, kept: _Kept) -> None:
    """Note in ``KEPT_CHANNELS``, per value that loses channels on one axis, that axis and
    which of its original channels remain (over every round of pruning), so that
    distillation can compare a pruned layer with the teacher's kept channels."""
    record = KEPT_CHANNELS.get(gm, {})
    KEPT_CHANNELS.set(gm, record)
    for node in gm.graph.nodes:
        span = kept.spans.get(node.name)
        if node.name not in kept.gone or span is None:
            continue
        if len(span.dims) != 1:
            record.pop(node.name, None)
            continue
        before = record.get(node.name, (span.axis, list(range(span.size))))[1]
        record[node.name] = (span.axis, [before[i] for i in kept(node).tolist()])


def apply_plan(gm: GraphModule, plan: Plan) -> None:
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


def prune_channels(gm: GraphModule, ctx: CompileContext, *, options: PruneOptions) -> PassResult:
    """Remove the planned channel sets from every layer, in ``options.steps`` rounds, calling
    ``options.between_steps(gm, step)`` between them (fine-tune there)."""
    options.check()
    steps, between_steps = options.steps, options.between_steps
    modified = False
    for step in range(1, steps + 1):
        plan = pruning_plan(gm, _step_options(options, step, steps))
        if step == 1:
            ctx.state.figures["prune_importance"] = functools.partial(importance_figure, plan)
            before = layer_table(gm, plan)
        if any(p.removed for p in plan.plans):
            apply_plan(gm, plan)
            modified = True
        if between_steps is not None and step < steps:
            gm.recompile()
            between_steps(gm, step)
    ctx.state.report.tables["prune"] = merge_tables(before, layer_table(gm, None))
    return PassResult(gm, modified=modified)


def _step_options(options: PruneOptions, step: int, steps: int) -> PruneOptions:
    """The share of what is left that round ``step`` of ``steps`` removes, so that the
    rounds together remove ``ratio`` of the original channels."""

    def share(ratio: float) -> float:
        done, target = ratio * (step - 1) / steps, ratio * step / steps
        return (target - done) / (1 - done)

    ratios = {name: share(r) for name, r in options.ratios.items()}
    return replace(options, ratio=share(options.ratio), ratios=ratios)
