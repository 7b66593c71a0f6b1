"""Dynamic INT8 Linear in ONNX Runtime's form: ``DynamicQuantizeLinear`` and ``MatMulInteger``.

``DynamicLinear(linear)`` holds the layer's weight as int8 (symmetric, per output channel, in
[-127, 127]) and quantizes its input on the fly, per call, to uint8 over the input's range
(widened to hold 0), as ONNX Runtime's ``DynamicQuantizeLinear`` does; the integer product
is scaled back to float and the bias added. In PyTorch it computes exactly that (the
integer accumulation in float64, so it is exact); exported to ONNX it is::

    x_q, x_scale, x_zero = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(x_q, W_q^T, x_zero, 0)) * (x_scale * w_scale) + bias

which ONNX Runtime fuses into its dynamic INT8 kernels. ``quantize_dynamic(engine="ort")``
makes these layers; the fbgemm/qnnpack engines use PyTorch's own dynamic kernels instead.

Example::

    layer = DynamicLinear(nn.Linear(384, 1536))
    layer(torch.randn(8, 128, 384))
"""

from __future__ import annotations

import torch
from torch import nn

from fxcomp.nn.fused import FusedModule
from fxcomp.quant.reference import weight_qparams
from fxcomp.quant.scheme import QScheme

__all__ = ["DynamicLinear"]

_WEIGHT = QScheme(torch.qint8, -127, 127, symmetric=True, per_channel=True)


def _quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX's ``DynamicQuantizeLinear``: uint8 over ``[min(x, 0), max(x, 0)]``, rounding half
    to even."""
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero, 0, 255), scale, zero


class _MatMulInteger(torch.autograd.Function):
    """The dynamic product, and its ONNX form."""

    @staticmethod
    def forward(ctx, x, weight_t, weight_scale, bias):
        x_q, scale, zero = _quantize_input(x)
        product = (x_q.double() - zero.double()) @ weight_t.double()
        y = (product * (scale.double() * weight_scale.double())).float()
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, weight_t, weight_scale, bias):
        x_q, scale, zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        weight_zero = g.op("Constant", value_t=torch.zeros((), dtype=torch.int8))
        product = g.op("MatMulInteger", x_q, weight_t, zero, weight_zero)
        as_float = g.op("Cast", product, to_i=1)  # TensorProto.FLOAT
        y = g.op("Mul", as_float, g.op("Mul", scale, weight_scale))
        return y if bias is None or bias.node().mustBeNone() else g.op("Add", y, bias)


class DynamicLinear(FusedModule):
    """A Linear with int8 weights and inputs quantized per call (module docstring).

    Example::

        DynamicLinear(nn.Linear(4, 2))(torch.randn(3, 4))
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale, _ = weight_qparams(weight, _WEIGHT)
        integers = torch.clamp(torch.round(weight / scale[:, None]), -127, 127)
        self.register_buffer("weight_t", integers.to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for."""
        return (self.weight_t.float() * self.weight_scale).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMulInteger.apply(x, self.weight_t, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"
