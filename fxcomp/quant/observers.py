"""Observers: modules that pass their input through and record the range it takes.

``MinMaxObserver`` keeps the running extremes; ``MovingAverageMinMaxObserver`` averages
each batch's extremes; ``HistogramObserver`` keeps a histogram and clips to a percentile;
``MSEObserver`` keeps the same histogram and shrinks its range while that lowers the
expected squared quantization error (rounding noise inside, clipping error outside).

Example::

    obs = HistogramObserver(activation_scheme, percentile=99.99)
    for x in batches:
        obs(x)
    scale, zero_point = obs.qparams()
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxcomp.quant.scheme import QScheme
from fxcomp.runtime.distributed import all_reduce_

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

    def all_reduce_(self) -> None:
        """Merge every rank's statistics (under torchrun), so that all ranks freeze alike."""
        all_reduce_(self.batches, "max")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lo, hi) range the grid must cover."""
        raise NotImplementedError

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, QScheme]:
        """(scale, zero_point, scheme) for the observed range: the scheme is the observer's,
        or the one its ``for_range`` picks for this range."""
        lo, hi = self.range()
        scheme = self.scheme.for_range(lo)
        return (*scheme.qparams(lo, hi), scheme)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) for the observed range."""
        scale, zero_point, _ = self.grid()
        return scale, zero_point


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

    def all_reduce_(self) -> None:
        super().all_reduce_()
        all_reduce_(self.lo, "min")
        all_reduce_(self.hi, "max")

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

    def all_reduce_(self) -> None:
        all_reduce_(self.batches, "max")
        all_reduce_(self.lo, "mean")
        all_reduce_(self.hi, "mean")


class HistogramObserver(Observer):
    """A histogram over the range seen so far (re-binned as it grows), clipped to a percentile."""

    def __init__(self, scheme: QScheme, bins: int = 2048, percentile: float = 99.99) -> None:
        super().__init__(scheme)
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

    def all_reduce_(self) -> None:
        """Every rank's histogram re-binned onto the common range, then averaged."""
        seen = bool(self.batches)
        all_reduce_(self.batches, "max")
        lo, hi = all_reduce_(self.lo.clone(), "min"), all_reduce_(self.hi.clone(), "max")
        if seen and (lo < self.lo or hi > self.hi):
            self.histogram = self._rebin(lo, hi)
        self.lo, self.hi = lo, hi
        all_reduce_(self.histogram, "mean")

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
    """The range found by shrinking the histogram's extent while the L2 error falls.

    Each step trims a quantile step of the mass from whichever end that moves further, and
    the expected squared error of putting the histogram on the integer grid is computed
    exactly per bin (values spread uniformly within a bin, clipped ones to the edge); the
    search stops at the first step that does not lower it. This keeps wide ranges unless
    clipping clearly pays, which serves deep networks better than the global minimum.
    """

    def __init__(self, scheme: QScheme, bins: int = 2048, step: float = 1e-5) -> None:
        super().__init__(scheme, bins=bins)
        self.step = step

    def _grid_bins(self) -> int:
        levels = self.scheme.qmax - self.scheme.qmin + 1
        return levels // 2 if self.scheme.reduce_range else levels

    def _error(self, first: int, last: int, density: np.ndarray, width: float) -> float:
        grid_width = width * (last - first + 1) / self._grid_bins()
        if grid_width == 0:
            return 0.0
        begin = (np.arange(self.bins) - first) * width
        end = begin + width
        n = self._grid_bins()
        bin_of_begin = np.clip(np.floor(begin / grid_width), 0, n - 1)
        bin_of_end = np.clip(np.floor(end / grid_width), 0, n - 1)

        def integral(lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
            return density * (np.power(hi, 3) - np.power(lo, 3)) / 3

        half = grid_width / 2
        error = integral(begin - (bin_of_begin + 0.5) * grid_width, half)
        error += (bin_of_end - bin_of_begin - 1) * integral(-half, half)
        error += integral(-half, end - (bin_of_end + 0.5) * grid_width)
        return float(error.sum())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.hi > self.lo:  # a constant: nothing to search
            return self.lo.clone(), self.hi.clone()
        histogram = self.histogram.numpy()
        total = histogram.sum()
        cumulative = np.cumsum(histogram)
        width = float(self.hi - self.lo) / self.bins
        density = histogram / width
        alpha, beta = 0.0, 1.0
        first, last = 0, self.bins - 1
        best = float("inf")
        while alpha < beta:
            next_alpha, next_beta = alpha + self.step, beta - self.step
            left = int(np.searchsorted(cumulative, next_alpha * total, side="left"))
            right = int(np.searchsorted(cumulative, next_beta * total, side="right")) - 1
            left, right = min(max(left, first), last), max(min(right, last), first)
            new_first, new_last = first, last
            if left - first > last - right:
                new_first, alpha = left, next_alpha
            else:
                new_last, beta = right, next_beta
            if (new_first, new_last) == (first, last):
                continue
            error = self._error(new_first, new_last, density, width)
            if error > best:
                break
            best, first, last = error, new_first, new_last
        lo = self.lo + width * first
        hi = self.lo + width * (last + 1)
        return lo.float(), hi.float()


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "mse": MSEObserver,
}
