"""The reference graph in the form ExecuTorch's XNNPACK partitioner consumes: ATen ops
between ``quantized_decomposed`` quantize/dequantize steps, as PT2E's ``convert_pt2e``
leaves them.

On a copy of the graph, each ``QuantDequant`` becomes ``quantize_per_tensor`` with its
scale and zero point as constants and one ``dequantize_per_tensor`` for each op reading it
(as PT2E's ``convert_pt2e`` duplicates them); each
``QuantizedWeightLayer`` becomes a ``DecomposedWeightLayer`` holding the int8 weight,
which it dequantizes per output channel (``dequantize_per_channel``) before the float
convolution or linear; each ``DynamicLinear`` (``quantize_dynamic``) becomes a
``DecomposedDynamicLinear``, whose input goes through ``choose_qparams`` ->
``quantize_per_tensor`` -> ``dequantize_per_tensor`` on the fly: XNNPACK's dynamically
quantized linear; each ``WeightOnlyLinear`` (``quantize_weights``) becomes the same with its
input quantized per row and its int8 or symmetric int4 weight dequantized per channel or
per group (``DecomposedWeightOnlyLinear``).

XNNPACK takes an op as quantized only when each of its inputs comes straight from a
dequantize, so after ops that keep their input's grid (max pooling, ReLU,
reshapes: ``shared`` in ``fxcomp.quant.ops``) a Q/DQ step on that same grid is added, as
PT2E's shared-qparams annotation does. Those ops leave values on the grid, so the step is
exact and the graph computes what the reference graph computes, up to the rounding of
``x / scale`` against ``x * (1 / scale)``. ``scaled_dot_product_attention`` calls become
their math (``attention_math``: matmul, mask, softmax, matmul), which XNNPACK runs:
ExecuTorch's lowering would decompose them anyway, into ops whose outputs have other strides
than the fused kernel the program was exported with, and a ``view`` exported on the fused
kernel's strides (GPT-2's ``x.view(-1, width)`` after attention) is then no longer valid. A
float graph goes through the same copy.

Example::

    import executorch.exir  # registers the quantized_decomposed ops
    decomposed = decomposed_graph(reference_gm)
    program = torch.export.export(decomposed, example_inputs)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from fxcomp.ir.graph import module_of, replace_module
from fxcomp.ir.module_copy import copy_module
from fxcomp.nn.fused import FusedModule, apply_weight
from fxcomp.nn.weight_only import WeightOnlyLinear
from fxcomp.quant.dynamic import DynamicLinear
from fxcomp.quant.ops import QUANT_KIND
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer, grid_of
from fxcomp.quant.scheme import QScheme

__all__ = [
    "DecomposedDynamicLinear",
    "DecomposedWeightLayer",
    "DecomposedWeightOnlyLinear",
    "attention_math",
    "decomposed_graph",
]

# Grid-keeping ops whose output is a tuple: their getitems are requantized instead.
_TUPLE_OUTPUTS = {torch.chunk, torch.split, "chunk", "split"}
_DTYPES = {torch.qint8: torch.int8, torch.quint8: torch.uint8}


def _ops():  # registered by torch once ExecuTorch's exir is imported
    return torch.ops.quantized_decomposed


def _grid_args(step: QuantDequant) -> tuple[float, int, int, int, torch.dtype]:
    scheme = step.scheme
    return (
        float(step.scale),
        int(step.zero_point),
        scheme.qmin,
        scheme.qmax,
        _DTYPES[scheme.dtype],
    )


class DecomposedWeightLayer(FusedModule):
    """A Conv/Linear (ReLU fused or not) whose weight is held as int8 with per-channel (or
    per-tensor) scales, dequantized by ``quantized_decomposed`` ops before the float op.

    Example::

        DecomposedWeightLayer(quantized_weight_layer)(x)
    """

    def __init__(self, layer: QuantizedWeightLayer) -> None:
        super().__init__()
        inner = layer.weighted
        self.layer = inner
        self.relu = layer.relu
        self.scheme: QScheme = layer.scheme
        self.register_buffer("integer_weight", layer.integer_weight().detach())
        self.register_buffer("weight_scale", layer.weight_scale.detach().clone())
        self.register_buffer("weight_zero_point", layer.weight_zero_point.detach().long())
        del inner.weight  # the int8 copy is the weight now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scheme = self.scheme
        dtype = _DTYPES[scheme.dtype]
        if self.weight_scale.dim():
            weight = _ops().dequantize_per_channel.default(
                self.integer_weight,
                self.weight_scale,
                self.weight_zero_point,
                scheme.axis,
                scheme.qmin,
                scheme.qmax,
                dtype,
            )
        else:
            weight = _ops().dequantize_per_tensor.default(
                self.integer_weight,
                float(self.weight_scale),
                int(self.weight_zero_point),
                scheme.qmin,
                scheme.qmax,
                dtype,
            )
        y = apply_weight(self.layer, x, weight, self.layer.bias)
        return torch.relu(y) if self.relu else y


class DecomposedDynamicLinear(FusedModule):
    """A ``DynamicLinear``: the input quantized per call to int8 over its range, the int8
    weight dequantized per output channel, a float linear between them.

    Example::

        DecomposedDynamicLinear(DynamicLinear(nn.Linear(4, 2)))(torch.randn(3, 4))
    """

    def __init__(self, layer: DynamicLinear) -> None:
        super().__init__()
        self.register_buffer("integer_weight", layer.weight_t.t().contiguous())
        self.register_buffer("weight_scale", layer.weight_scale.detach().clone())
        self.register_buffer("weight_zero_point", torch.zeros_like(layer.weight_scale).long())
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, eps = _ops(), torch.finfo(torch.float32).eps
        scale, zero_point = ops.choose_qparams.tensor(x, -128, 127, eps, torch.int8)
        quantized = ops.quantize_per_tensor.tensor(x, scale, zero_point, -128, 127, torch.int8)
        x = ops.dequantize_per_tensor.tensor(quantized, scale, zero_point, -128, 127, torch.int8)
        weight = ops.dequantize_per_channel.default(
            self.integer_weight, self.weight_scale, self.weight_zero_point, 0, -127, 127, torch.int8
        )
        return torch.nn.functional.linear(x, weight, self.bias)


class DecomposedWeightOnlyLinear(FusedModule):
    """A ``WeightOnlyLinear`` (``quantize_weights``) as XNNPACK's dynamically quantized
    linear: the input quantized per row to int8 on the fly, the weight dequantized from int8
    per output channel or from symmetric int4 per group (``dequantize_per_channel_group``,
    codes -8..7), a float linear between them. XNNPACK has no linear with float inputs and
    integer weights, so the program quantizes what the reference graph keeps in float.

    Example::

        DecomposedWeightOnlyLinear(weight_only_linear)(torch.randn(3, 256))
    """

    def __init__(self, layer: WeightOnlyLinear) -> None:
        super().__init__()
        self.bits, self.group_size = layer.bits, layer.group_size
        codes = layer.codes()
        integer = codes if layer.bits == 8 else codes.to(torch.int8) - 8  # 0..15 -> -8..7
        scale = layer.scale.detach().float()
        self.register_buffer("integer_weight", integer.contiguous())
        self.register_buffer("weight_scale", scale[:, 0].clone() if layer.bits == 8 else scale)
        self.register_buffer("weight_zero_point", torch.zeros_like(self.weight_scale).long())
        self.register_buffer("input_scale", layer.input_scale)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        if self.input_scale is not None:
            x = x * self.input_scale
        scale, zero_point = ops.choose_qparams_per_token_asymmetric.default(x, torch.int8)
        quantized = ops.quantize_per_token.default(x, scale, zero_point, -128, 127, torch.int8)
        x = ops.dequantize_per_token.default(
            quantized, scale, zero_point, -128, 127, torch.int8, x.dtype
        )
        if self.bits == 8:
            weight = ops.dequantize_per_channel.default(
                self.integer_weight,
                self.weight_scale,
                self.weight_zero_point,
                0,
                -127,
                127,
                torch.int8,
            )
        else:
            weight = ops.dequantize_per_channel_group.default(
                self.integer_weight,
                self.weight_scale,
                self.weight_zero_point,
                -8,
                7,
                torch.int8,
                self.group_size,
                x.dtype,
            )
        return torch.nn.functional.linear(x, weight, self.bias)


def _quantize_for_users(gm: GraphModule, node: Node, value: Node, grid: QuantDequant) -> None:
    """``quantize(value)`` on ``grid`` after ``node``, and in place of ``node`` for each of
    its users a ``dequantize`` of its own: PT2E's form, in which XNNPACK's partitioner takes
    each dequantize with the one op that reads it (a dequantize shared by two ops in
    different partitions would tie them into a cycle)."""
    args = _grid_args(grid)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        quantized = gm.graph.call_function(_ops().quantize_per_tensor.default, (value, *args))
    for user in users:
        with gm.graph.inserting_before(user):
            dequantized = gm.graph.call_function(
                _ops().dequantize_per_tensor.default, (quantized, *args)
            )
        user.replace_input_with(node, dequantized)


def _requantize_shared(gm: GraphModule) -> None:
    """A Q/DQ step on the input's grid after each grid-keeping op fed by a quantized value."""
    for node in list(gm.graph.nodes):
        if node.meta.get(QUANT_KIND) != "shared" or node.target in _TUPLE_OUTPUTS:
            continue
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        grid = grid_of(gm, inputs[0]) if inputs else None
        if grid is not None and node.users:
            _quantize_for_users(gm, node, node, grid)


_DECOMPOSED = {
    QuantizedWeightLayer: DecomposedWeightLayer,
    DynamicLinear: DecomposedDynamicLinear,
    WeightOnlyLinear: DecomposedWeightOnlyLinear,
}


def attention_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` in eval mode, written out as its documented math.

    Example::

        attention_math(q, k, v, is_causal=True)
    """
    if enable_gqa:
        repeats = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeats, -3)
        value = value.repeat_interleave(repeats, -3)
    scores = (
        query @ key.transpose(-2, -1) * (1 / math.sqrt(query.size(-1)) if scale is None else scale)
    )
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores, -1) @ value


def _attention_as_math(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            node.target = attention_math


def decomposed_graph(gm: GraphModule) -> GraphModule:
    """A copy of the reference graph (or float graph) ``gm`` in ``quantized_decomposed`` form
    (module docstring); ``gm`` itself is left as it is."""
    copy = copy_module(gm)
    assert isinstance(copy, GraphModule)
    _attention_as_math(copy)
    _requantize_shared(copy)  # reads the QuantDequant modules: before they go
    layers: dict[int, FusedModule] = {}  # a layer called twice is one layer
    for node in list(copy.graph.nodes):
        module = module_of(copy, node)
        if isinstance(module, QuantDequant):
            _quantize_for_users(copy, node, node.args[0], module)
            copy.graph.erase_node(node)
        elif isinstance(module, QuantizedWeightLayer | DynamicLinear | WeightOnlyLinear):
            if id(module) not in layers:
                layers[id(module)] = _DECOMPOSED[type(module)](module)
            replace_module(copy, str(node.target), layers[id(module)])
    copy.graph.eliminate_dead_code()
    copy.delete_all_unused_submodules()
    copy.recompile()
    return copy
