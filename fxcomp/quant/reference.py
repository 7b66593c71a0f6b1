"""The reference quantized graph: float ops whose quantized edges pass through Q/DQ steps.

``QuantDequant`` is a fixed per-tensor quantize->dequantize on an activation edge.
``QuantizedWeightLayer`` wraps a Conv/Linear (or a fused ``ConvReLU``/``LinearReLU``) and
runs it with its weight quantized per output channel (or per tensor). Both are plain float
computations on core torch ops, so the reference graph runs in Python, is the numerical
reference for every backend, and exports to ONNX as QuantizeLinear/DequantizeLinear.

Example::

    qdq = QuantDequant(torch.tensor(0.02), torch.tensor(0), activation_scheme)
    layer = QuantizedWeightLayer(conv, weight_scheme)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.ir.graph import module_of
from fxcomp.nn.fused import ConvReLU, FusedModule, LinearReLU, apply_weight, weighted_layer
from fxcomp.quant.ops import QUANT_KIND, tensor_inputs
from fxcomp.quant.scheme import QScheme

__all__ = ["QuantDequant", "QuantizedWeightLayer", "fake_quantize", "grid_of", "weight_qparams"]

_ONNX_TYPES = {torch.quint8: 2, torch.qint8: 3}  # TensorProto.UINT8, TensorProto.INT8


class _QuantizeDequantize(torch.autograd.Function):
    """A fixed per-tensor Q/DQ pair that exports as exactly QuantizeLinear -> DequantizeLinear
    with typed zero points (no casts between them, which runtimes would not fuse)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int, onnx_type: int):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, onnx_type):
        dtype = torch.uint8 if onnx_type == _ONNX_TYPES[torch.quint8] else torch.int8
        scale_v = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zero_v = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        quantized = g.op("QuantizeLinear", x, scale_v, zero_v)
        return g.op("DequantizeLinear", quantized, scale_v, zero_v)


class _DequantizeWeight(torch.autograd.Function):
    """Integer weights and their scales as a float weight; exports as DequantizeLinear on an
    int8 initializer (per output channel on axis 0, or per tensor)."""

    @staticmethod
    def forward(ctx, quantized, scale):
        shape = (-1,) + (1,) * (quantized.dim() - 1) if scale.dim() else ()
        return quantized.float() * scale.reshape(shape)

    @staticmethod
    def symbolic(g, quantized, scale):
        zero = torch.zeros(scale.type().sizes() or (), dtype=torch.int8)
        zero_v = g.op("Constant", value_t=zero)
        return g.op("DequantizeLinear", quantized, scale, zero_v, axis_i=0)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme
) -> torch.Tensor:
    """``dequantize(quantize(x))`` on ``scheme``'s grid, per tensor or per channel.

    Example::

        fake_quantize(w, scale, zero_point, weight_scheme)
    """
    if scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(
            x, scale, zero_point.int(), scheme.qmin, scheme.qmax
        )
    return torch.fake_quantize_per_channel_affine(
        x, scale, zero_point.int(), scheme.axis, scheme.qmin, scheme.qmax
    )


def weight_qparams(weight: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of a weight from its range: per output channel (axis 0) when
    ``scheme.per_channel``, else per tensor.

    Example::

        scale, zero_point = weight_qparams(conv.weight.detach(), weight_scheme)
    """
    if scheme.per_channel:
        flat = weight.reshape(weight.shape[0], -1)
        return scheme.qparams(flat.amin(1), flat.amax(1))
    return scheme.qparams(weight.min(), weight.max())


class QuantDequant(FusedModule):
    """A fixed quantize->dequantize step on an activation edge.

    Example::

        QuantDequant(torch.tensor(0.1), torch.tensor(128), scheme)(x)
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.register_buffer("scale", scale.detach().float().reshape(()))
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _QuantizeDequantize.apply(
                x,
                self.scale.item(),
                int(self.zero_point.item()),
                self.scheme.qmin,
                self.scheme.qmax,
                _ONNX_TYPES[self.scheme.dtype],
            )
        return fake_quantize(x, self.scale, self.zero_point, self.scheme)

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest values the grid holds; values beyond are clipped."""
        scale, zero_point = float(self.scale), int(self.zero_point)
        return scale * (self.scheme.qmin - zero_point), scale * (self.scheme.qmax - zero_point)

    def extra_repr(self) -> str:
        scale, zero_point = float(self.scale), int(self.zero_point)
        return f"scale={scale:.6g}, zero_point={zero_point}, dtype={self.scheme.dtype}"


class QuantizedWeightLayer(FusedModule):
    """A Conv/Linear (fused with ReLU or not) run with its weight on ``scheme``'s grid.

    The weight's qparams come from its range (symmetric, per output channel when the scheme
    says so); ``scheme.per_channel`` decides. The float weight is kept, so the layer can be
    re-quantized or exported.

    Example::

        QuantizedWeightLayer(nn.Linear(4, 2), weight_scheme)(torch.randn(3, 4))
    """

    def __init__(self, layer: nn.Module, scheme: QScheme) -> None:
        super().__init__()
        inner = weighted_layer(layer)
        if inner is None:
            raise TypeError(f"cannot quantize the weight of {type(layer).__name__}")
        self.layer = layer
        self.scheme = scheme
        self.relu = isinstance(layer, (ConvReLU, LinearReLU))
        scale, zero_point = weight_qparams(inner.weight.detach(), scheme)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point.to(torch.int32))

    @property
    def weighted(self) -> nn.Module:
        """The Conv or Linear inside."""
        return weighted_layer(self.layer)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as a quantized tensor (per channel or per tensor)."""
        weight = self.weighted.weight.detach()
        if self.weight_scale.dim() == 0:
            return torch.quantize_per_tensor(
                weight, float(self.weight_scale), int(self.weight_zero_point), self.scheme.dtype
            )
        return torch.quantize_per_channel(
            weight, self.weight_scale.double(), self.weight_zero_point.long(), 0, self.scheme.dtype
        )

    def integer_weight(self) -> torch.Tensor:
        """The weight's integers (int8) in plain tensor ops, which an exporter folds into a
        constant."""
        weight, scale = self.weighted.weight, self.weight_scale
        if scale.dim():
            scale = scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        integers = torch.round(weight / scale) + self.weight_zero_point.reshape(scale.shape)
        return torch.clamp(integers, self.scheme.qmin, self.scheme.qmax).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.weighted
        if torch.onnx.is_in_onnx_export():
            weight = _DequantizeWeight.apply(self.integer_weight(), self.weight_scale)
        else:
            weight = fake_quantize(
                inner.weight, self.weight_scale, self.weight_zero_point, self.scheme
            )
        y = apply_weight(inner, x, weight, inner.bias)
        return torch.relu(y) if self.relu else y


def grid_of(gm: GraphModule, node: Node, step: type[nn.Module] = QuantDequant) -> Any:
    """The Q/DQ step (or another ``step`` type: an observer) whose grid ``node``'s value
    lies on, following grid-keeping ops back; None for a float value."""
    while True:
        module = module_of(gm, node)
        if isinstance(module, step):
            return module
        inputs = tensor_inputs(node)
        if node.meta.get(QUANT_KIND) not in ("shared", "requant") or not inputs:
            return None
        node = inputs[0]
