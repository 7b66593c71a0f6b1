"""Channel pruning: remove whole channel sets from every layer they pass through.

``Conv(x)[C] -> Conv'(x)[C - k]`` and every consumer with it: the channel dependency graph
(``fxcomp.channels``) says which channels are tied; in each prunable group the ``ratio``
of channel sets with the lowest importance (L2 or L1 magnitude of every weight they touch:
producer rows, BatchNorm scale and shift, consumer columns; or random) is removed, and
Conv, Linear and BatchNorm parameters, buffers and attributes are sliced for real. The
result is an ordinary smaller model. Groups that touch the model's inputs or outputs, or an
op the graph does not know, keep all their channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.channels import ChannelGraph, Group
from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.fused import weighted_layer
from fxcomp.graph import BATCHNORMS, module_of
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.trace import propagate_shapes

__all__ = ["PruneOptions", "prune", "prune_channels", "pruning_plan", "zero_channels"]

Channel = tuple[str, int]


@dataclass(frozen=True)
class PruneOptions:
    """How much to prune and how to rank channels."""

    ratio: float = 0.5
    importance: str = "l2"
    round_to: int | None = None
    min_channels: int = 1
    seed: int = 0


def _carriers(gm: GraphModule, node: Node) -> list[tuple[torch.Tensor, int]]:
    """The parameters that carry the channels of ``node``'s value, each with its channel axis:
    producer rows and bias, BatchNorm scale and shift, consumer columns."""
    found: list[tuple[torch.Tensor, int]] = []
    module = module_of(gm, node)
    layer = weighted_layer(module)
    if layer is not None:
        found.append((layer.weight, 0))
        if layer.bias is not None:
            found.append((layer.bias, 0))
    elif type(module) in BATCHNORMS and module.affine:
        found += [(module.weight, 0), (module.bias, 0)]
    for user in node.users:
        consumer = weighted_layer(module_of(gm, user))
        if consumer is not None and user.args[0] is node and getattr(consumer, "groups", 1) == 1:
            found.append((consumer.weight, 1))
    return found


def _channel_scores(gm: GraphModule, node: Node, power: int) -> torch.Tensor:
    """Per channel of ``node``'s value: the summed |w|^power of every weight carrying it."""
    scores = torch.zeros(node.meta["tensor_meta"].shape[1], dtype=torch.float64)
    for tensor, axis in _carriers(gm, node):
        magnitude = tensor.detach().abs().double().pow(power)
        scores += magnitude.movedim(axis, 0).reshape(magnitude.shape[axis], -1).sum(1)
    return scores


def pruning_plan(
    gm: GraphModule, options: PruneOptions
) -> tuple[list[Group], list[frozenset[Channel]]]:
    """The groups of ``gm`` and the channel sets ``options`` removes from them."""
    if not 0 <= options.ratio < 1:
        raise InputError(f"prune ratio must be in [0, 1), got {options.ratio}")
    if options.importance not in ("l1", "l2", "random"):
        raise InputError(f"unknown importance '{options.importance}'", hint="use l1, l2 or random")
    nodes = {n.name: n for n in gm.graph.nodes}
    groups = ChannelGraph.build(gm).groups()
    generator = torch.Generator().manual_seed(options.seed)
    removed: list[frozenset[Channel]] = []
    for group in groups:
        if not group.prunable:
            continue
        total = len(group.channel_sets)
        keep = max(options.min_channels, total - math.floor(total * options.ratio))
        if options.round_to:
            keep = max(options.round_to, round(keep / options.round_to) * options.round_to)
        keep = min(keep, total)
        if keep == total:
            continue
        if options.importance == "random":
            scores = torch.rand(total, generator=generator).tolist()
        else:
            power = 1 if options.importance == "l1" else 2
            per_value = {v: _channel_scores(gm, nodes[v], power) for v in group.values}
            scores = [sum(per_value[v][c].item() for v, c in s) for s in group.channel_sets]
        removed += _lowest(group, scores, total - keep, nodes, options)
    return groups, removed


def _lowest(
    group: Group, scores: list[float], count: int, nodes: dict[str, Node], options: PruneOptions
) -> list[frozenset[Channel]]:
    """Up to ``count`` lowest-scoring channel sets whose removal leaves every value of the group
    at least its share: a ``cat`` ties several layers into one group, and each keeps
    ``1 - ratio`` of its own channels."""
    left = {v: nodes[v].meta["tensor_meta"].shape[1] for v in group.values}
    floor = {
        v: max(options.min_channels, n - math.floor(n * options.ratio)) for v, n in left.items()
    }
    chosen = []
    for i in sorted(range(len(scores)), key=lambda i: scores[i]):
        if len(chosen) == count:
            break
        per_value: dict[str, int] = {}
        for value, _ in group.channel_sets[i]:
            per_value[value] = per_value.get(value, 0) + 1
        if all(left[v] - n >= floor[v] for v, n in per_value.items()):
            for v, n in per_value.items():
                left[v] -= n
            chosen.append(group.channel_sets[i])
    return chosen


def zero_channels(gm: GraphModule, removed: list[frozenset[Channel]]) -> None:
    """Zero every parameter slice of the ``removed`` channels (the exactness oracle's model)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    with torch.no_grad():
        for channel_set in removed:
            for value, c in channel_set:
                for tensor, axis in _carriers(gm, nodes[value]):
                    tensor.select(axis, c).zero_()


def _slice_module(module: nn.Module, keep_in: torch.Tensor | None, keep_out: torch.Tensor) -> None:
    """Slice ``module`` in place to the kept input and output channels."""
    layer = weighted_layer(module)
    with torch.no_grad():
        if type(module) in BATCHNORMS:
            for name in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(module, name)
                if tensor is not None:
                    tensor.data = tensor.data[keep_out].clone()
            module.num_features = len(keep_out)
            return
        depthwise = isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1
        weight = layer.weight.data[keep_out]
        if keep_in is not None and not depthwise:
            weight = weight[:, keep_in]
        layer.weight.data = weight.clone()
        if layer.bias is not None:
            layer.bias.data = layer.bias.data[keep_out].clone()
        if isinstance(layer, nn.Linear):
            layer.out_features, layer.in_features = weight.shape[0], weight.shape[1]
        else:
            layer.out_channels = weight.shape[0]
            layer.in_channels = len(keep_out) if depthwise else weight.shape[1] * layer.groups
            if depthwise:
                layer.groups = len(keep_out)


def prune_channels(
    gm: GraphModule, ctx: CompileContext, *, options: PruneOptions = PruneOptions()
) -> PassResult:
    """Remove the planned channel sets from every layer (module docstring)."""
    _, removed = pruning_plan(gm, options)
    if not removed:
        return PassResult(gm, modified=False)
    gone = {channel for channel_set in removed for channel in channel_set}

    def kept(node: Node) -> torch.Tensor:
        count = node.meta["tensor_meta"].shape[1]
        kept_channels = [c for c in range(count) if (node.name, c) not in gone]
        return torch.tensor(kept_channels, dtype=torch.long)

    for node in gm.graph.find_nodes(op="call_module"):
        module = module_of(gm, node)
        if weighted_layer(module) is None and type(module) not in BATCHNORMS:
            continue
        keep_in = kept(node.args[0]) if weighted_layer(module) is not None else None
        keep_out = kept(node)
        unchanged = len(keep_out) == node.meta["tensor_meta"].shape[1] and (
            keep_in is None or len(keep_in) == node.args[0].meta["tensor_meta"].shape[1]
        )
        if not unchanged:
            _slice_module(module, keep_in, keep_out)
    propagate_shapes(gm, ctx.example_inputs)
    return PassResult(gm, modified=True)


def prune(
    ratio: float = 0.5,
    *,
    importance: str = "l2",
    round_to: int | None = None,
    min_channels: int = 1,
    seed: int = 0,
) -> Pass:
    """Remove ``ratio`` of the channels of every prunable group, ranked by ``importance``.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.prune(0.5)])
    """
    options = PruneOptions(ratio, importance, round_to, min_channels, seed)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return prune_channels(gm, ctx, options=options)

    return Pass("prune", run, run_before=("quantize", "qat"))
