"""Fake quantization for training: the reference graph's rounding, with gradients.

``FakeQuantize`` sits where an observer sat. In training mode it records each batch in its
observer (until ``observing`` is turned off) and rounds the batch onto the grid the
observer's range gives; with ``learned=True`` the scale is a parameter instead, set from
the first batch's range and then trained by gradient (LSQ: the straight-through estimator
for the values, a scaled gradient for the scale). Either way it is an ``Observer``, so
``freeze`` turns it into the fixed ``QuantDequant`` step its qparams say.

``SharedGrid`` rounds a value onto another edge's grid, where the reference graph rounds
again (after average pooling).

``QATWeight`` wraps a Conv/Linear (``ConvReLU``, ``LinearReLU``, or a ``ConvBN`` whose
BatchNorm still trains) and rounds its weight onto the weight grid at every forward
(per output channel, from the weight's current range), the gradient passing straight
through. For a ``ConvBN`` the weight is rounded as it will be once BatchNorm is folded,
``fq(w * gamma / sigma)``, and the conv's output is scaled back before BatchNorm so that
BatchNorm trains on batch statistics (until it is put in eval mode). ``trained_layer`` gives
back the plain layer, BatchNorm folded, ready for ``freeze``.

Example::

    fq = FakeQuantize(MovingAverageMinMaxObserver(activation_scheme))
    layer = QATWeight(ConvReLU(conv), weight_scheme)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxcomp.nn.fused import ConvBN, ConvReLU, FusedModule, LinearReLU, apply_weight, weighted_layer
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import fake_quantize, weight_qparams
from fxcomp.quant.scheme import QScheme

__all__ = ["FakeQuantize", "QATWeight", "SharedGrid"]


class FakeQuantize(Observer):
    """An activation edge rounded onto its grid during training (module docstring)."""

    def __init__(self, observer: Observer, learned: bool = False) -> None:
        super().__init__(observer.scheme)
        self.observer = observer
        self.learned = learned
        self.observing = True
        self.batches = observer.batches.clone()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learned)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        self.learned_scheme = observer.scheme  # the grid a learned scale lies on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
            return x
        if self.training and self.observing and not (self.learned and self.batches):
            self.observer(x)
            self.batches.copy_(self.observer.batches)
            if self.learned:
                scale, zero_point, self.learned_scheme = self.observer.grid()
                with torch.no_grad():
                    self.scale.copy_(scale)
                    self.zero_point.copy_(zero_point)
        if not self.batches:
            return x
        if not self.learned:
            return fake_quantize(x, *self.observer.grid())
        lo, hi = self.learned_scheme.qmin, self.learned_scheme.qmax
        scale = self.scale.clamp(min=torch.finfo(torch.float32).eps).reshape(1)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, self.zero_point.float().reshape(1), lo, hi, 1.0 / math.sqrt(x.numel() * hi)
        )

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.observer.range()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, QScheme]:
        if not self.learned:
            return self.observer.grid()
        scale = self.scale.detach().clamp(min=torch.finfo(torch.float32).eps)
        return scale.clone(), self.zero_point.clone(), self.learned_scheme

    def all_reduce_(self) -> None:
        self.observer.all_reduce_()
        self.batches.copy_(self.observer.batches)

    def extra_repr(self) -> str:
        return f"learned={self.learned}, observing={self.observing}"


class SharedGrid(nn.Module):
    """Rounding onto another edge's grid, as the reference graph does after average pooling
    (``freeze`` puts a fixed Q/DQ step there); the source is referenced, not owned.

    Example::

        SharedGrid(fake)(pooled)
    """

    def __init__(self, source: FakeQuantize) -> None:
        super().__init__()
        self._source = (source,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self._source[0]
        if not source.batches:
            return x
        return fake_quantize(x, *source.grid())


class QATWeight(FusedModule):
    """A weighted layer trained with its weight on ``scheme``'s grid (module docstring)."""

    def __init__(self, layer: nn.Module, scheme: QScheme) -> None:
        super().__init__()
        self.layer = layer
        self.scheme = scheme
        inner = layer.conv if isinstance(layer, ConvBN) else weighted_layer(layer)
        if inner is None:
            raise TypeError(f"cannot train the weight of {type(layer).__name__} on a grid")
        self.inner = inner
        self.relu = isinstance(layer, (ConvReLU, LinearReLU)) or getattr(layer, "relu", False)

    def _rounded(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zero_point = weight_qparams(weight.detach(), self.scheme)
        return fake_quantize(weight, scale, zero_point, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        if isinstance(self.layer, ConvBN):
            bn = self.layer.bn
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            factor = gamma / torch.sqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (inner.weight.dim() - 1)
            y = apply_weight(inner, x, self._rounded(inner.weight * factor.reshape(shape)), None)
            out_shape = (1, -1) + (1,) * (y.dim() - 2)
            y = y / factor.reshape(out_shape)
            if inner.bias is not None:
                y = y + inner.bias.reshape(out_shape)
            y = bn(y)
        else:
            y = apply_weight(inner, x, self._rounded(inner.weight), inner.bias)
        return torch.relu(y) if self.relu else y

    def trained_layer(self) -> nn.Module:
        """The layer as ``freeze`` takes it: a ``ConvBN``'s BatchNorm folded into its conv."""
        return self.layer.folded() if isinstance(self.layer, ConvBN) else self.layer
