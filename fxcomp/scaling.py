"""Channel scaling between two layers, the move behind cross-layer equalization and
SmoothQuant: ``C(f(P(x)))`` is unchanged when output channel ``c`` of ``P`` is divided by
``s_c > 0`` and input channel ``c`` of ``C`` multiplied by it, provided every op ``f``
between them acts on each channel alone and commutes with a positive scale (ReLU, max and
average pooling, dropout, identity, and a flatten of a 1x1 map).

``scale_pairs(gm)`` finds every such (producer, consumer) pair: a Conv (not grouped) or
Linear whose output reaches exactly one Conv (not grouped) or Linear through such ops and
nothing else, each module called from one place only. ``rescale_(gm, pair, s)`` applies
the scales to the weights and biases.

Example::

    for pair in scale_pairs(gm):
        rescale_(gm, pair, torch.ones(pair.channels))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.fused import weighted_layer
from fxcomp.graph import module_of

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
    """Two layers whose shared channels can be rescaled; ``channels`` of them."""

    producer: str
    consumer: str
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


def scale_pairs(gm: GraphModule) -> list[ScalePair]:
    """Every (producer, consumer) pair of ``gm`` whose channels can be rescaled."""
    pairs = []
    for node in gm.graph.nodes:
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
                    pairs.append(ScalePair(str(node.target), str(user.target), channels))
                break
            if not _channelwise(gm, user, channels):
                break
            value = user
    return pairs


def rescale_(gm: GraphModule, pair: ScalePair, scale: torch.Tensor) -> None:
    """Divide ``pair.producer``'s output channels by ``scale`` and multiply
    ``pair.consumer``'s input channels by it, in place."""
    producer = weighted_layer(gm.get_submodule(pair.producer))
    consumer = weighted_layer(gm.get_submodule(pair.consumer))
    if not torch.all(scale > 0) or not math.isfinite(float(scale.sum())):
        raise ValueError("channel scales must be positive and finite")
    with torch.no_grad():
        rows = (-1,) + (1,) * (producer.weight.dim() - 1)
        producer.weight.div_(scale.reshape(rows).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.div_(scale.to(producer.bias.dtype))
        columns = (1, -1) + (1,) * (consumer.weight.dim() - 2)
        consumer.weight.mul_(scale.reshape(columns).to(consumer.weight.dtype))
