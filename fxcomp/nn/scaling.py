"""Channel scaling between a producer and its consumers, the move behind cross-layer
equalization and SmoothQuant: ``C(f(P(x)))`` is unchanged when output channel ``c`` of ``P``
is divided by ``s_c > 0`` and input channel ``c`` of ``C`` multiplied by it, provided every
op ``f`` between them acts on each channel alone and commutes with a positive scale (ReLU,
max and average pooling, dropout, identity, and a flatten of a 1x1 map).

``scale_pairs(gm)`` finds every such pair: a Conv (not grouped) or Linear whose output
reaches exactly one Conv (not grouped) or Linear through such ops and nothing else, each
module called from one place only. With ``norms=True`` it also finds the Transformer case:
a LayerNorm with affine weights over the last axis whose output feeds only Linear layers,
directly (a pre-norm block's ``LN -> q_proj, k_proj, v_proj`` or ``LN -> fc1``); its
weight and bias are divided, every consumer's input columns multiplied. ``rescale_(gm,
pair, s)`` applies the scales to the weights and biases.

Example::

    for pair in scale_pairs(gm, norms=True):
        rescale_(gm, pair, torch.ones(pair.channels))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.ir.graph import module_of
from fxcomp.nn.fused import weighted_layer

__all__ = ["ScalePair", "rescale_", "scale_pairs"]

_MODULES = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.Dropout,
    nn.Identity,
)
_FUNCTIONS = {torch.relu, F.relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout}
_METHODS = {"relu"}


@dataclass(frozen=True)
class ScalePair:
    """A producer and the consumers of its ``channels`` channels, which can be rescaled:
    one Conv/Linear consumer of a Conv/Linear, or the Linear consumers of a LayerNorm."""

    producer: str
    consumers: tuple[str, ...]
    channels: int


def _layer(gm: GraphModule, node: Node) -> nn.Module | None:
    layer = weighted_layer(module_of(gm, node))
    if layer is None or getattr(layer, "groups", 1) != 1:
        return None
    return layer


def _channelwise(gm: GraphModule, node: Node, channels: int) -> bool:
    if node.op == "call_module":
        return type(module_of(gm, node)) in _MODULES
    if node.op == "call_method":
        return node.target in _METHODS
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return True
    if node.op == "call_function" and node.target is torch.flatten:
        meta = node.meta.get("tensor_meta")
        return hasattr(meta, "shape") and len(meta.shape) == 2 and meta.shape[1] == channels
    return False


def _called_once(gm: GraphModule, *nodes: Node) -> bool:
    """Each node's module is called from that node alone (rescaling changes every call)."""
    return all(len(gm.graph.find_nodes(op="call_module", target=n.target)) == 1 for n in nodes)


def scale_pairs(gm: GraphModule, *, norms: bool = False) -> list[ScalePair]:
    """Every rescalable pair of ``gm``; with ``norms``, LayerNorm producers too."""
    pairs = []
    for node in gm.graph.nodes:
        if norms and (pair := _norm_pair(gm, node)) is not None:
            pairs.append(pair)
        producer = _layer(gm, node)
        if producer is None:
            continue
        channels = producer.weight.shape[0]
        value = node
        while len(value.users) == 1:
            user = next(iter(value.users))
            consumer = _layer(gm, user)
            if consumer is not None:
                if consumer.weight.shape[1] == channels and _called_once(gm, node, user):
                    pairs.append(ScalePair(str(node.target), (str(user.target),), channels))
                break
            if not _channelwise(gm, user, channels):
                break
            value = user
    return pairs


def _norm_pair(gm: GraphModule, node: Node) -> ScalePair | None:
    """A LayerNorm (affine, over the last axis) whose every user is a Linear reading it."""
    norm = module_of(gm, node)
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        return None
    if len(norm.normalized_shape) != 1 or not node.users:
        return None
    channels = norm.normalized_shape[0]
    for user in node.users:
        consumer = _layer(gm, user)
        if not isinstance(consumer, nn.Linear) or consumer.in_features != channels:
            return None
    if not _called_once(gm, node, *node.users):
        return None
    return ScalePair(str(node.target), tuple(str(u.target) for u in node.users), channels)


def rescale_(gm: GraphModule, pair: ScalePair, scale: torch.Tensor) -> None:
    """Divide ``pair.producer``'s output channels by ``scale`` and multiply every
    consumer's input channels by it, in place."""
    if not torch.all(scale > 0) or not math.isfinite(float(scale.sum())):
        raise ValueError("channel scales must be positive and finite")
    producer = gm.get_submodule(pair.producer)
    producer = producer if isinstance(producer, nn.LayerNorm) else weighted_layer(producer)
    with torch.no_grad():
        rows = (-1,) + (1,) * (producer.weight.dim() - 1)
        producer.weight.div_(scale.reshape(rows).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.div_(scale.to(producer.bias.dtype))
        for name in pair.consumers:
            consumer = weighted_layer(gm.get_submodule(name))
            columns = (1, -1) + (1,) * (consumer.weight.dim() - 2)
            consumer.weight.mul_(scale.reshape(columns).to(consumer.weight.dtype))
