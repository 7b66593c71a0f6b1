"""The training loop that the training-time passes (``distill``, ``qat``, ``share_weights``)
share.

``fit(objective, model, data, training, desc=...)`` trains for ``training.epochs``:
``objective(inputs, label)`` returns one batch's loss terms, of which ``"loss"`` is
minimised. Adam at ``lr`` decays on a cosine over the whole run unless an ``optimizer`` is
given (``lr=None``: the learning rate a short range test finds,
``fxcomp.runtime.lr_range``); each epoch's figures include the learning rate it started at;
a progress bar shows the loss and throughput; ``before_epoch(epoch)`` runs at the start of
each epoch, after the model is put in training mode, and ``callback(epoch, model,
figures)`` after it; with ``validation`` data, the best epoch of ``model`` by ``metric``
(top-1 accuracy by default) is kept. Training is seeded by ``seed`` without touching the
caller's random state.

Under ``torchrun`` the objective runs inside ``DistributedDataParallel`` (gradients averaged
across ranks), each rank trains on its shard of ``data`` (``fxcomp.runtime.distributed.shard``),
and buffers (BatchNorm statistics, observers) are made equal after every epoch, so every
rank validates, keeps and returns the same model.

Example::

    figures = fit(objective, gm, batches, TrainOptions(epochs=3, lr=1e-3), desc="distill")
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fxcomp.ir.errors import InputError
from fxcomp.runtime.distributed import average_buffers, is_main_process, shard, world
from fxcomp.runtime.lr_range import find_lr

__all__ = [
    "Callback",
    "LoopOptions",
    "Metric",
    "OptimizerFactory",
    "Supervised",
    "TrainOptions",
    "fit",
    "split_batch",
    "split_labeled",
    "top1_accuracy",
]

log = logging.getLogger(__name__)

Metric = Callable[[Callable[..., Any], Iterable[Any]], float]
Callback = Callable[[int, GraphModule, dict[str, float]], None]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def split_batch(
    batch: Any, count: int, index: int, what: str = "calibration"
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """A batch's ``count`` model inputs and the items after them (a label, as a
    ``DataLoader`` yields ``(inputs..., label)``); a tensor is one input and nothing more.

    Example::

        inputs, rest = split_batch((x, y), 1, 0)   # ((x,), (y,))
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), ()
    if isinstance(batch, (tuple, list)) and len(batch) >= count:
        return tuple(batch[:count]), tuple(batch[count:])
    raise InputError(
        f"{what} batch {index} is a {type(batch).__name__}, not a tensor or a tuple "
        f"of {count} input(s)",
        hint="yield tensors, or tuples (inputs..., label) as a DataLoader does",
    )


def split_labeled(batch: Any, count: int, index: int, what: str) -> tuple[tuple[Any, ...], Any]:
    """(inputs, label or None) of a batch: a tensor, ``count`` inputs, or (inputs..., label).

    Example::

        inputs, label = split_labeled((x, y), 1, 0, "training")   # ((x,), y)
    """
    inputs, rest = split_batch(batch, count, index, what)
    if len(rest) > 1:
        raise InputError(
            f"{what} batch {index} has {count + len(rest)} items; the model takes "
            f"{count} input(s), and one label may follow",
            hint="yield tensors, input tuples, or (inputs..., labels) as a DataLoader does",
        )
    return inputs, rest[0] if rest else None


def top1_accuracy(model: Callable[..., Any], data: Iterable[Any]) -> float:
    """Top-1 accuracy in percent of ``model`` over ``(inputs..., labels)`` batches.

    Example::

        top1_accuracy(gm, [(x, y)])   # 97.5
    """
    right = total = 0
    with torch.no_grad():
        for batch in data:
            *inputs, labels = batch
            right += (model(*inputs).argmax(-1) == labels).sum().item()
            total += len(labels)
    if not total:
        raise InputError("the validation data is empty")
    return 100.0 * right / total


class Supervised(nn.Module):
    """The hard-label loss of one batch (cross-entropy unless ``loss`` is given), as an
    objective for ``fit``; ``what`` names the pass in the error for unlabeled data.

    Example::

        fit(Supervised(gm, None, "qat"), gm, batches, TrainOptions(2, 1e-4), desc="qat")
    """

    def __init__(
        self, gm: GraphModule, loss: Callable[[Any, Any], torch.Tensor] | None, what: str
    ) -> None:
        super().__init__()
        self.student = gm
        self.loss = loss or F.cross_entropy
        self.what = what

    def forward(self, inputs: tuple[Any, ...], label: Any) -> dict[str, torch.Tensor]:
        if label is None:
            raise InputError(
                f"{self.what} data has no labels",
                hint="yield (inputs, labels) batches, or give a teacher to distil from",
            )
        return {"loss": self.loss(self.student(*inputs), label)}


class LoopOptions(TypedDict, total=False):
    """The keyword options every training-time pass takes for its loop, besides ``epochs``
    and ``lr`` (``TrainOptions`` documents them)."""

    optimizer: OptimizerFactory | None
    validation: Iterable[Any] | None
    metric: Metric
    callback: Callback | None
    seed: int
    progress: bool


@dataclass(frozen=True)
class TrainOptions:
    """How a training-time pass trains (module docstring): epochs, Adam's ``lr`` (None: found
    by a range test) or an ``optimizer`` made from the parameter list, the ``validation`` data
    and ``metric`` that pick the best epoch, a ``callback`` after each epoch, the seed, a
    progress bar."""

    epochs: int = 1
    lr: float | None = 1e-3
    optimizer: OptimizerFactory | None = None
    validation: Iterable[Any] | None = None
    metric: Metric = top1_accuracy
    callback: Callback | None = None
    seed: int = 0
    progress: bool = True

    @classmethod
    def of(cls, what: str, epochs: int, lr: float | None, loop: LoopOptions) -> TrainOptions:
        """The options of pass ``what`` from its ``epochs``, ``lr`` and loop keywords;
        ``InputError`` for a keyword that is not one.

        Example::

            TrainOptions.of("distill", 3, 1e-3, {"validation": held_out, "seed": 1})
        """
        unknown = sorted(set(loop) - set(LoopOptions.__annotations__))
        if unknown:
            raise InputError(
                f"{what} takes no option {unknown[0]!r}",
                hint=f"its training options: epochs, lr, {', '.join(LoopOptions.__annotations__)}",
            )
        return cls(epochs, lr, **loop)

    def check(self, what: str) -> None:
        """Raise ``InputError`` naming the option of pass ``what`` that is not usable."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"{what} epochs must be a positive integer, got {self.epochs!r}")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"{what} lr must be positive (or None, to find it), got {self.lr}")


def _sized(data: Iterable[Any]) -> int | None:
    return len(data) if hasattr(data, "__len__") else None


def fit(
    objective: nn.Module,
    model: GraphModule,
    data: Iterable[Any],
    training: TrainOptions,
    *,
    desc: str,
    before_epoch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``objective`` (whose parameters include ``model``'s) on ``data``; the figures of
    each epoch: mean loss terms, seconds, and ``metric`` on ``validation`` if given."""
    epochs, seed, validation = training.epochs, training.seed, training.validation
    if iter(data) is data:
        raise InputError(f"{desc} data is a one-pass iterator", hint="give a list or a DataLoader")
    inputs = len(model.graph.find_nodes(op="placeholder"))
    rank, size = world()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = [p for p in objective.parameters() if p.requires_grad]
        if not params:
            raise InputError(f"{desc}: the graph has no trainable parameters")
        step = objective  # buffers are averaged once per epoch, not synced at every forward
        if size > 1:
            step = DistributedDataParallel(objective, forward_sync_buffers=False)
        optimizer, lr = training.optimizer, training.lr
        if optimizer is None and lr is None:

            def loss_of(batch: Any) -> torch.Tensor:
                return objective(*split_labeled(batch, inputs, 0, "training"))["loss"]

            model.train()
            objective.train()
            lr = find_lr(objective, params, loss_of, shard(data, epoch=0, seed=seed)).chosen
            log.info("%s: learning rate %.3g from a range test", desc, lr)
        opt = optimizer(params) if optimizer else torch.optim.Adam(params, lr)
        per_epoch = _sized(shard(data, epoch=0, seed=seed))
        schedule = None
        if optimizer is None and per_epoch:
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        history = []
        show = training.progress and is_main_process()
        bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not show or None)
        for epoch in bar:
            model.train()
            objective.train()
            if before_epoch is not None:  # after train(): it may put modules back in eval
                before_epoch(epoch)
            started_at = opt.param_groups[0]["lr"]
            figures = _epoch(step, opt, schedule, shard(data, epoch=epoch, seed=seed), inputs, bar)
            figures["lr"] = started_at
            average_buffers(model)
            model.eval()
            if validation is not None:
                figures["metric"] = training.metric(model, validation)
                if best is None or figures["metric"] > best[0]:
                    best = (figures["metric"], copy.deepcopy(model.state_dict()))
            history.append(figures)
            log.info("%s epoch %d (rank %d of %d): %s", desc, epoch, rank, size, figures)
            if training.callback is not None:
                training.callback(epoch, model, figures)
    if best is not None:
        model.load_state_dict(best[1])
    return history


def _epoch(
    step: nn.Module,
    opt: torch.optim.Optimizer,
    schedule: Any,
    batches: Iterable[Any],
    inputs: int,
    bar: Any,
) -> dict[str, float]:
    totals: dict[str, float] = {}
    count, samples, start = 0, 0, time.perf_counter()
    for index, batch in enumerate(batches):
        args, label = split_labeled(batch, inputs, index, "training")
        terms = step(args, label)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach())
        count += 1
        samples += len(args[0]) if isinstance(args[0], torch.Tensor) else 1
        rate = samples / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}", samples_s=f"{rate:.0f}")
    if not count:
        raise InputError("the training data is empty", hint="pass at least one batch")
    figures = {key: value / count for key, value in totals.items()}
    figures["seconds"] = time.perf_counter() - start
    return figures
