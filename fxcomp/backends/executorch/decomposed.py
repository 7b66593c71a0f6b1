"""The reference graph in the form ExecuTorch's XNNPACK partitioner consumes: ATen ops
between ``quantized_decomposed`` quantize/dequantize steps, as PT2E's ``convert_pt2e``
leaves them.

On a copy of the graph, each ``QuantDequant`` becomes ``quantize_per_tensor`` with its
scale and zero point as constants and one ``dequantize_per_tensor`` for each op reading it
(as PT2E's ``convert_pt2e`` duplicates them); each
``QuantizedWeightLayer`` becomes a ``DecomposedWeightLayer`` holding the int8 weight,
which it dequantizes per output channel (``dequantize_per_channel``) before the float
convolution or linear. XNNPACK takes an op as quantized only when each of its inputs comes
straight from a dequantize, so after ops that keep their input's grid (max pooling, ReLU,
reshapes: ``shared`` in ``fxcomp.quant.ops``) a Q/DQ step on that same grid is added, as
PT2E's shared-qparams annotation does. Those ops leave values on the grid, so the step is
exact and the graph computes what the reference graph computes, up to the rounding of
``x / scale`` against ``x * (1 / scale)``.

Example::

    import executorch.exir  # registers the quantized_decomposed ops
    decomposed = decomposed_graph(reference_gm)
    program = torch.export.export(decomposed, example_inputs)
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxcomp.ir.graph import module_of, replace_module
from fxcomp.ir.module_copy import copy_module
from fxcomp.nn.fused import FusedModule, apply_weight
from fxcomp.quant.ops import QUANT_KIND
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer, grid_of
from fxcomp.quant.scheme import QScheme

__all__ = ["DecomposedWeightLayer", "decomposed_graph"]

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


def decomposed_graph(gm: GraphModule) -> GraphModule:
    """A copy of the reference graph ``gm`` in ``quantized_decomposed`` form (module
    docstring); ``gm`` itself is left as it is."""
    copy = copy_module(gm)
    assert isinstance(copy, GraphModule)
    _requantize_shared(copy)  # reads the QuantDequant modules: before they go
    layers: dict[int, DecomposedWeightLayer] = {}  # a layer called twice is one layer
    for node in list(copy.graph.nodes):
        module = module_of(copy, node)
        if isinstance(module, QuantDequant):
            _quantize_for_users(copy, node, node.args[0], module)
            copy.graph.erase_node(node)
        elif isinstance(module, QuantizedWeightLayer):
            if id(module) not in layers:
                layers[id(module)] = DecomposedWeightLayer(module)
            replace_module(copy, str(node.target), layers[id(module)])
    copy.graph.eliminate_dead_code()
    copy.delete_all_unused_submodules()
    copy.recompile()
    return copy
