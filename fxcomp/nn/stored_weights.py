"""Layers whose weight is stored in another form than the float32 parameter they compute with.

``StoredWeightLayer`` is the common shape: a Conv/Linear (fused with ReLU or not) whose own
weight parameter is dropped, and which computes with ``computed_weight()`` instead.
``HalfWeightLayer`` keeps its weight in float16 or bfloat16 and computes in float32
(``cast_weights``); ``SharedWeightLayer`` keeps a lookup table and an index per weight
(palettization, ``share_weights``): 1-D k-means (scikit-learn, initialised at evenly spaced
quantiles, so the result is deterministic) into ``2**bits`` values.

Example::

    HalfWeightLayer(nn.Linear(4, 2), torch.float16)(torch.randn(3, 4))
    SharedWeightLayer(nn.Linear(4, 2), bits=2).storage_bytes()
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from fxcomp.nn.fused import ConvReLU, FusedModule, LinearReLU, apply_weight, weighted_layer

__all__ = ["HalfWeightLayer", "SharedWeightLayer", "StoredWeightLayer", "cluster_weight"]


class StoredWeightLayer(FusedModule):
    """A Conv/Linear (fused with ReLU or not) computing with ``computed_weight()``; the layer
    keeps its configuration and bias, its weight parameter goes (the subclass stores it its
    own way).

    Example::

        class Doubled(StoredWeightLayer):
            def computed_weight(self): return 2 * self.stored
    """

    def __init__(self, layer: nn.Module, what: str) -> None:
        super().__init__()
        inner = weighted_layer(layer)
        if inner is None:
            raise TypeError(f"cannot {what} the weight of {type(layer).__name__}")
        self.relu = isinstance(layer, (ConvReLU, LinearReLU))
        self._float_weight = inner.weight.detach()
        del inner.weight
        self.layer = inner

    def computed_weight(self) -> torch.Tensor:
        """The weight the layer computes with (``forward`` casts it to the input's dtype)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_weight(self.layer, x, self.computed_weight().to(x.dtype), self.layer.bias)
        return torch.relu(y) if self.relu else y


class HalfWeightLayer(StoredWeightLayer):
    """A Conv/Linear whose weight is stored in 16 bits (``torch.float16``/``bfloat16``).

    Example::

        HalfWeightLayer(nn.Linear(4, 2), torch.float16)(torch.randn(3, 4))
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(layer, "cast")
        self.register_buffer("weight", self._float_weight.to(dtype))
        del self._float_weight

    def computed_weight(self) -> torch.Tensor:
        """The stored 16-bit weight."""
        return self.weight


class SharedWeightLayer(StoredWeightLayer):
    """A Conv/Linear whose weight is ``lut[indices]``: ``2**bits`` shared values.

    Example::

        SharedWeightLayer(nn.Linear(4, 2), bits=2)(torch.randn(3, 4))
    """

    def __init__(self, layer: nn.Module, bits: int) -> None:
        super().__init__(layer, "share")
        lut, indices = cluster_weight(self._float_weight, 2**bits)
        del self._float_weight
        self.bits = bits
        self.lut = nn.Parameter(lut)
        self.register_buffer("indices", indices)

    def weight(self) -> torch.Tensor:
        """The weight the layer computes with: each index's table value."""
        return self.lut[self.indices.long()]

    def computed_weight(self) -> torch.Tensor:
        """``weight()``."""
        return self.weight()

    def storage_bytes(self) -> int:
        """Bytes to store the weight: the packed indices and the float32 table."""
        return math.ceil(self.indices.numel() * self.bits / 8) + 4 * self.lut.numel()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, values={self.lut.numel()}"


def cluster_weight(weight: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table of at most ``clusters`` values, uint8 index of each weight's nearest value).

    Example::

        lut, indices = cluster_weight(conv.weight.detach(), 16)
    """
    values = weight.flatten().double().numpy()
    distinct = np.unique(values)
    if len(distinct) <= clusters:
        lut = distinct
    else:
        start = np.quantile(values, (np.arange(clusters) + 0.5) / clusters).reshape(-1, 1)
        fit = KMeans(clusters, init=np.unique(start).reshape(-1, 1), n_init=1, random_state=0)
        lut = np.sort(fit.fit(values.reshape(-1, 1)).cluster_centers_.ravel())
    edges = (lut[1:] + lut[:-1]) / 2
    indices = np.searchsorted(edges, values).reshape(weight.shape)
    return torch.tensor(lut, dtype=weight.dtype), torch.tensor(indices, dtype=torch.uint8)
