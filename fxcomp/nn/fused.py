"""Fused units that ``fuse`` creates: later passes treat each as one quantizable op.

``ConvReLU(conv)`` computes ``relu(conv(x))``, ``LinearReLU(linear)`` computes
``relu(linear(x))`` and ``add_relu(a, b)`` computes ``relu(a + b)``. ``ConvBN(conv, bn)``
computes ``bn(conv(x))`` (then ReLU with ``relu=True``) while the BatchNorm still trains,
for quantization-aware training, which folds it at the end. They are ordinary
modules and functions, so a fused graph runs, saves and exports like any other.

Example::

    unit = ConvReLU(nn.Conv2d(3, 8, 3))
    unit(torch.randn(1, 3, 8, 8)).min() >= 0
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from fxcomp.ir.graph import CONVS
from fxcomp.ir.trace import OpaqueModule
from fxcomp.nn.batchnorm import fold_batchnorm_

__all__ = [
    "ConvBN",
    "ConvReLU",
    "FusedModule",
    "LinearReLU",
    "add_relu",
    "apply_weight",
    "weighted_layer",
]


class FusedModule(OpaqueModule):
    """Base of fxcomp's fused units; fxcomp's tracer keeps them as single nodes."""


class _LayerReLU(FusedModule):
    """``relu(layer(x))``; the layer is held under the attribute ``held`` names."""

    held = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(getattr(self, self.held)(x))


class ConvReLU(_LayerReLU):
    """``relu(conv(x))`` for a Conv1d, Conv2d or Conv3d.

    Example::

        ConvReLU(nn.Conv2d(3, 8, 3))(torch.randn(1, 3, 8, 8))
    """

    held = "conv"

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv


class LinearReLU(_LayerReLU):
    """``relu(linear(x))``. Example: ``LinearReLU(nn.Linear(4, 2))(torch.randn(3, 4))``."""

    held = "linear"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear


class ConvBN(FusedModule):
    """``bn(conv(x))``, then ReLU if ``relu``: a Conv whose BatchNorm is not folded yet.

    Example::

        ConvBN(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), relu=True)(torch.randn(2, 3, 8, 8))
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, relu: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.relu else y

    def folded(self) -> nn.Module:
        """The unit with its BatchNorm folded into the conv (in place): the conv, or a
        ``ConvReLU``/``LinearReLU`` of it."""
        fold_batchnorm_(self.conv, self.bn)
        if not self.relu:
            return self.conv
        return LinearReLU(self.conv) if isinstance(self.conv, nn.Linear) else ConvReLU(self.conv)

    def extra_repr(self) -> str:
        return "relu=True" if self.relu else ""


@torch.fx.wrap
def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a + b)``, one node in a traced graph.

    Example::

        add_relu(torch.ones(2), -2 * torch.ones(2))  # tensor([0., 0.])
    """
    return torch.relu(a + b)


def apply_weight(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``layer`` (a Conv or Linear) computed on ``x`` with ``weight`` and ``bias`` in place of
    its own: how wrappers that hold the weight in another form run the layer.

    Example::

        apply_weight(conv, x, rounded_weight, conv.bias)
    """
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def weighted_layer(module: nn.Module | None) -> nn.Module | None:
    """The Conv or Linear a module computes with (the one inside a fused unit), or None.

    Example::

        weighted_layer(ConvReLU(conv)) is conv
    """
    if isinstance(module, ConvReLU):
        return module.conv
    if isinstance(module, LinearReLU):
        return module.linear
    return module if type(module) in (*CONVS, nn.Linear) else None
