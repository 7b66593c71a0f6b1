"""Observers: modules that pass their input through and record the range it takes.

``MinMaxObserver`` keeps the running extremes; ``MovingAverageMinMaxObserver`` averages
each batch's extremes; ``HistogramObserver`` keeps a histogram and clips to a percentile;
``MSEObserver`` keeps the same histogram and picks the clipping range that minimises the
expected squared quantization error (rounding noise inside, clipping error outside).

Example::

    obs = HistogramObserver(activation_scheme, percentile=99.99)
    for x in batches:
        obs(x)
    scale, zero_point = obs.qparams()
"""

from __future__ import annotations

import torch
from torch import nn

from fxcomp.quant.scheme import QScheme

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
]


class Observer(nn.Module):
    """Base: records statistics of what passes through; ``qparams`` turns them into a grid."""

    def __init__(self, scheme: QScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and not x.is_meta:
            with torch.no_grad():
                self.record(x.detach().float())
                self.batches += 1
        return x

    def record(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lo, hi) range the grid must cover."""
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) for the observed range."""
        lo, hi = self.range()
        return self.scheme.qparams(lo, hi)


class MinMaxObserver(Observer):
    """The smallest and largest values seen."""

    def __init__(self, scheme: QScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def record(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.lo = torch.minimum(self.lo, lo)
        self.hi = torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's extremes."""

    def __init__(self, scheme: QScheme, averaging_constant: float = 0.01) -> None:
        super().__init__(scheme)
        self.averaging_constant = averaging_constant

    def record(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        if self.batches == 0:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo = self.lo + c * (lo - self.lo)
            self.hi = self.hi + c * (hi - self.hi)


class HistogramObserver(Observer):
    """A histogram over the range seen so far (re-binned as it grows), clipped to a percentile."""

    def __init__(self, scheme: QScheme, bins: int = 2048, percentile: float = 99.99) -> None:
        super().__init__(scheme)
        if bins % 4:
            raise ValueError(f"bins must be a multiple of 4, got {bins}")
        self.bins = bins
        self.percentile = percentile
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def record(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        new_lo, new_hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if new_hi <= new_lo:  # constant input so far
            new_hi = new_lo + 1e-8
        if self.batches and (new_lo < self.lo or new_hi > self.hi):
            self.histogram = self._rebin(new_lo, new_hi)
        self.lo, self.hi = new_lo, new_hi
        self.histogram += torch.histc(x, self.bins, float(new_lo), float(new_hi)).double()

    def _rebin(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        centres = self.lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        index = ((centres - lo) / ((hi - lo) / self.bins)).long().clamp(0, self.bins - 1)
        return torch.zeros_like(self.histogram).index_add_(0, index, self.histogram)

    def _edges(self) -> torch.Tensor:
        return torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        edges = self._edges()
        tail = (100.0 - self.percentile) / 100.0
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        return edges[lo_bin].float(), edges[min(hi_bin + 1, self.bins)].float()


class MSEObserver(HistogramObserver):
    """The clipping range that minimises the expected squared error, searched on the histogram."""

    def __init__(self, scheme: QScheme, bins: int = 2048, candidates: int = 48) -> None:
        super().__init__(scheme, bins=bins)
        self.candidates = candidates

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The search runs on a histogram 4x coarser than the one kept: fast and precise enough.
        histogram = self.histogram.reshape(-1, 4).sum(1)
        edges = self._edges()[::4]
        centres = (edges[:-1] + edges[1:]) / 2
        shrink = torch.linspace(1.0 / self.candidates, 1.0, self.candidates, dtype=torch.float64)
        lo_max = torch.clamp(self.lo.double(), max=0.0)
        hi_max = torch.clamp(self.hi.double(), min=0.0)
        if self.scheme.symmetric:  # one bound to search
            bound = torch.maximum(-lo_max, hi_max) * shrink
            lo, hi = -bound, bound
        else:  # both ends, independently
            lo = (lo_max * shrink)[:, None].expand(-1, self.candidates).reshape(-1)
            hi = (hi_max * shrink)[None, :].expand(self.candidates, -1).reshape(-1)
        scale, _ = self.scheme.qparams(lo, hi)
        clipped = torch.clamp(centres, lo[:, None], hi[:, None])
        inside = (centres == clipped).double()
        error = (centres - clipped) ** 2 + inside * scale.double()[:, None] ** 2 / 12
        best = int(torch.argmin(error @ histogram))
        return lo[best].float(), hi[best].float()


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "mse": MSEObserver,
}
