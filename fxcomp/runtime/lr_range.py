"""The learning rate a training-time pass uses when none is given: a short range test.

Adam runs ``steps`` batches (cycling through the data if it has fewer) at a learning rate
that grows geometrically from ``low`` to ``high``; the loss, smoothed, is recorded at each
step and the test stops once it has blown up (four times its lowest). If it blew up, the
learning rate chosen is a tenth of the one where the smoothed loss was lowest (the rule of
Smith's range test), clamped to ``[low, high / 10]``. If it never did, the lowest point is
only where the test ended, and a tenth of it can still be far too high (a fine-tuned network
without BatchNorm, after ``fuse``, diverged at the 0.08 it gave): the rate is then taken
halfway down the longest valley of the curve, its longest decreasing run (fastai's
``valley`` rule). The objective's parameters
and buffers are put back as they were; under ``torchrun`` the ranks agree on the
geometric mean of their choices.

Example::

    lr = find_lr(objective, params, step, batches)   # e.g. 8e-3 for a pruned CNN
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxcomp.runtime.distributed import world

__all__ = ["RangeTest", "find_lr"]


@dataclass(frozen=True)
class RangeTest:
    """The learning rates tried, the smoothed loss at each, and the one chosen."""

    lrs: list[float]
    losses: list[float]
    chosen: float


def find_lr(
    objective: nn.Module,
    params: list[nn.Parameter],
    loss_of: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    steps: int = 60,
    low: float = 1e-5,
    high: float = 1.0,
) -> RangeTest:
    """The range test (module docstring) of Adam on ``params``: ``loss_of(batch)`` is one
    batch's loss through ``objective``, whose state is restored afterwards."""
    state = copy.deepcopy(objective.state_dict())
    opt = torch.optim.Adam(params, lr=low)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed, best = 0.0, math.inf
    for step, batch in zip(range(steps), itertools.cycle(batches), strict=False):
        lr = low * (high / low) ** (step / max(1, steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        smoothed = 0.9 * smoothed + 0.1 * value
        lrs.append(lr)
        losses.append(smoothed / (1 - 0.9 ** (step + 1)))
        best = min(best, losses[-1])
        if losses[-1] > 4 * best:
            break
    objective.load_state_dict(state)
    if not losses:
        chosen = low
    elif len(losses) < steps:  # it blew up
        chosen = min(max(lrs[losses.index(min(losses))] / 10, low), high / 10)
    else:
        chosen = lrs[_valley(losses)]
    if world()[1] > 1:  # every rank trains with the same learning rate
        log_lr = torch.tensor([math.log(chosen)], dtype=torch.float64)
        dist.all_reduce(log_lr)
        chosen = math.exp(float(log_lr) / world()[1])
    return RangeTest(lrs, losses, chosen)


def _valley(losses: list[float]) -> int:
    """The index halfway down the longest decreasing run of ``losses`` (not necessarily
    contiguous: the longest decreasing subsequence, which noise does not break)."""
    run = [1] * len(losses)  # run[i]: the longest decreasing run ending at i
    start = end = 0
    for i in range(1, len(losses)):
        run[i] = 1 + max((run[j] for j in range(i) if losses[j] > losses[i]), default=0)
        if run[i] > run[end]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)
