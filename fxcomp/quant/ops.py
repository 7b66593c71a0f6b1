"""How each graph node takes part in quantization: one table, shared by every quantize pass.

* ``weighted``: Conv/Linear (fused with ReLU, or with a BatchNorm that still trains, or
  not): weight quantized, own output grid.
* ``binary``, ``cat``, ``hardswish``: quantized kernels with their own output grid.
* ``fixed``: sigmoid and hardsigmoid, whose quantized kernels output a fixed grid.
* ``shared``: ops that run on quantized tensors exactly and keep the input's grid (max
  pooling, ReLU, clamps, reshapes, dropout in eval).
* ``requant``: ops that keep the input's grid but round again (average pooling, mean).
* ``pooled``: the same ops on engines that give them their own output grid
  (``Engine.pools_on_own_grid``); ``insert_observers`` records it, ``kind_of`` never returns it.
* ``query``: shape queries (``size``, ``dim``, ``numel``, ``.shape``), which read a
  quantized tensor as it is.
* ``float``: everything else; it runs in float between a dequantize and a quantize.

Example::

    kinds = {node.name: kind_of(gm, node) for node in gm.graph.nodes}
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.ir.errors import InputError, did_you_mean
from fxcomp.nn.fused import ConvBN, ConvReLU, LinearReLU, add_relu, weighted_layer

__all__ = [
    "KINDS",
    "QUANT_KIND",
    "SkipSpec",
    "check_skip",
    "is_clamp",
    "kind_of",
    "op_name",
    "tensor_inputs",
]

# node.meta key: the node's quantization kind (one of KINDS, or "observer" for the observer
# and Q/DQ steps), written by insert_observers and followed by freeze, lower and QAT
QUANT_KIND = "fxcomp_quant"

KINDS = (
    "weighted",
    "binary",
    "cat",
    "hardswish",
    "fixed",
    "shared",
    "requant",
    "pooled",
    "query",
    "float",
)
_QUERY_METHODS = {"size", "dim", "numel"}
_QUERY_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
SkipSpec = str | type[nn.Module]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, ConvReLU, LinearReLU, ConvBN)
_MODULES = {
    "hardswish": (nn.Hardswish,),
    "fixed": (nn.Sigmoid, nn.Hardsigmoid),
    "shared": (
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.ReLU,
        nn.ReLU6,
        nn.Hardtanh,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.Identity,
        nn.Flatten,
    ),
    "requant": (
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
    ),
}
_FUNCTIONS = {
    "binary": {operator.add, torch.add, operator.mul, torch.mul, add_relu},
    "cat": {torch.cat},
    "hardswish": {F.hardswish},
    "fixed": {torch.sigmoid, F.sigmoid, F.hardsigmoid},
    "shared": {
        torch.relu,
        torch.relu_,
        F.relu,
        F.relu6,
        F.hardtanh,
        torch.flatten,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.dropout,
        torch.reshape,
        torch.transpose,
        torch.permute,
        torch.chunk,
        torch.split,
        torch.squeeze,
        torch.unsqueeze,
        operator.getitem,
    },
    "requant": {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean},
}
_METHODS = {
    "binary": {"add", "mul"},
    "fixed": {"sigmoid"},
    "shared": {
        "relu",
        "relu_",
        "flatten",
        "view",
        "reshape",
        "permute",
        "transpose",
        "contiguous",
        "chunk",
        "split",
        "squeeze",
        "unsqueeze",
        "clamp",
    },
    "requant": {"mean"},
}


_CLAMP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_CLAMP_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu6, F.hardtanh, torch.clamp}
_CLAMP_METHODS = {"relu", "relu_", "clamp"}


def is_clamp(gm: GraphModule, node: Node) -> bool:
    """Whether ``node`` is a ReLU, ReLU6, Hardtanh or clamp: an activation a QDQ runtime
    fuses into the Conv before it when no Q/DQ step separates them."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _CLAMP_MODULES
    if node.op == "call_function":
        return node.target in _CLAMP_FUNCTIONS
    return node.op == "call_method" and node.target in _CLAMP_METHODS


_ACTIVATION_MODULES = (nn.SiLU, nn.GELU, nn.Mish, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)
_ACTIVATION_FUNCTIONS = {
    F.silu,
    F.gelu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    torch.sigmoid,
    torch.tanh,
}
_ACTIVATION_METHODS = {"sigmoid", "tanh"}


def is_activation(gm: GraphModule, node: Node) -> bool:
    """Whether ``node`` is a clamp or an element-wise activation (SiLU, GELU, Mish,
    hardswish, the sigmoids, tanh): what OpenVINO fuses into the convolution or linear before
    it as a post-op when no Q/DQ step separates them."""
    if is_clamp(gm, node):
        return True
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _ACTIVATION_MODULES
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def op_name(node: Node) -> str:
    """The name ``skip`` matches for a non-module node: function or method name."""
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def tensor_inputs(node: Node) -> list[Node]:
    """The input nodes that carry tensors (not sizes or other Python values)."""
    return [n for n in node.all_input_nodes if _is_tensor(n)]


def _is_tensor(node: Node) -> bool:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return False
    if hasattr(meta, "shape"):  # TensorMetadata, itself a NamedTuple
        return True
    return isinstance(meta, (tuple, list)) and bool(meta) and all(hasattr(m, "shape") for m in meta)


def _skipped(gm: GraphModule, node: Node, skip: Iterable[SkipSpec]) -> bool:
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    # a type matches a fused unit through the layer inside it
    layers = [module, module.conv if isinstance(module, ConvBN) else weighted_layer(module)]
    for spec in skip:
        if isinstance(spec, type) and any(isinstance(m, spec) for m in layers if m is not None):
            return True
        if isinstance(spec, str) and (
            (
                module is not None
                and (node.target == spec or str(node.target).startswith(spec + "."))
            )
            or (module is None and spec in (op_name(node), node.name))
        ):
            return True
    return False


def check_skip(gm: GraphModule, skip: Iterable[SkipSpec]) -> None:
    """Raise ``InputError`` for a ``skip`` name that matches nothing in ``gm`` (a misspelt
    name would leave the layer quantized), with the closest names there are."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    for spec in skip:
        if isinstance(spec, str) and not any(_skipped(gm, n, (spec,)) for n in nodes):
            known = {str(n.target) if n.op == "call_module" else n.name for n in nodes}
            known |= {op_name(n) for n in nodes if n.op != "call_module"}
            raise InputError(
                f"skip names {spec!r}, which is no module, op or node of the graph",
                hint=did_you_mean(
                    spec, known, "skip takes module names, op names ('add') and node names"
                ),
            )


def _is_query(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _QUERY_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _QUERY_ATTRIBUTES
    )


def _floating(node: Node) -> bool:
    """Whether ``node`` and the tensors it reads are floating point (integer tensors, token
    ids and masks, are never quantized)."""
    metas = [
        node.meta.get("tensor_meta"),
        *(n.meta.get("tensor_meta") for n in tensor_inputs(node)),
    ]
    leaves = [m for meta in metas for m in ([meta] if hasattr(meta, "shape") else meta or ())]
    return all(m.dtype.is_floating_point for m in leaves if hasattr(m, "dtype"))


def kind_of(gm: GraphModule, node: Node, skip: Iterable[SkipSpec] = ()) -> str:
    """The quantization kind of ``node`` (one of ``KINDS``); skipped nodes, and nodes on
    integer tensors, are ``float``."""
    if _is_query(node):
        return "query"
    if node.op not in ("call_module", "call_function", "call_method") or not _is_tensor(node):
        return "float"
    if _skipped(gm, node, skip) or not _floating(node):
        return "float"
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) in _WEIGHTED:
            return "weighted"
        return next((k for k, types in _MODULES.items() if type(module) in types), "float")
    table = _FUNCTIONS if node.op == "call_function" else _METHODS
    kind = next((k for k, targets in table.items() if node.target in targets), "float")
    if kind == "binary" and (len(tensor_inputs(node)) != 2 or node.kwargs):
        return "float"  # scalar operands, alpha=... and friends stay float
    if kind == "cat" and node.kwargs.get("out") is not None:
        return "float"
    return kind
