"""BatchNorm helpers: folding one into the layer before it, and re-estimating statistics.

``fold_batchnorm_`` makes ``layer(x)`` compute the old ``bn(layer(x))``.

Random-weight models have degenerate activations until their BatchNorm statistics match
the input distribution, and a model whose layers changed (pruned, quantized for training)
needs fresh statistics too. This runs the batches in train mode with a cumulative average,
then returns the model in eval mode. It changes the model it is given.

Example::

    fold_batchnorm_(conv, bn)
    reestimate_batchnorm(torchvision.models.resnet50(), [torch.randn(8, 3, 224, 224)] * 4)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["fold_batchnorm_", "reestimate_batchnorm"]


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Reset every BatchNorm's statistics, average them over ``batches``; return the model in
    eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def fold_batchnorm_(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear, bn: nn.Module) -> None:
    """Fold an eval-mode ``bn`` into ``layer`` in place, so that ``layer(x)`` is ``bn(layer(x))``.

    The per-channel scale and shift are computed in float64 and applied once in the layer's
    dtype: one rounding per weight.

    Example::

        fold_batchnorm_(conv, bn)   # conv(x) now equals the old bn(conv(x)) up to rounding
    """
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    dtype = layer.weight.dtype
    new_bias = ((bias - bn.running_mean.double()) * scale + beta).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(scale.to(dtype).reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(new_bias)
