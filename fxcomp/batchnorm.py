"""Re-estimating BatchNorm statistics on representative inputs.

Random-weight models have degenerate activations until their BatchNorm statistics match
the input distribution, and a model whose layers changed (pruned, quantized for training)
needs fresh statistics too. This runs the batches in train mode with a cumulative average,
then returns the model in eval mode. It changes the model it is given.

Example::

    reestimate_batchnorm(torchvision.models.resnet50(), [torch.randn(8, 3, 224, 224)] * 4)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["reestimate_batchnorm"]


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
