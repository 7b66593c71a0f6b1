"""Knowledge distillation: train the graph (the student) to match a teacher model.

``student(x) -> student'(x)``, trained on ``data`` to minimise, per batch::

    alpha * T^2 * KL(softmax(teacher(x) / T) || softmax(student(x) / T))
    + (1 - alpha) * CE(student(x), label)            (batches that carry labels)
    + feature_weight * sum over ``features`` of MSE(student node, teacher node)

(``fxcomp.runtime.distillation``). A student layer that ``prune`` shrank is compared with the
teacher's kept channels (the graph slot ``KEPT_CHANNELS``). The teacher is traced on a deep
copy: the model given is never changed. Progress shows loss and throughput; Adam at ``lr``
decays on a cosine over the whole run (unless an ``optimizer`` is given); without an ``lr``,
a range test of 60 steps finds it (``fxcomp.runtime.lr_range``);
``callback(epoch, student, figures)`` runs after each epoch; with ``validation`` data the
student's best epoch by ``metric`` (top-1 accuracy by default) is kept.

Example::

    passes=[fuse(), prune(0.5), distill(model, train_batches, epochs=3, validation=val)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Unpack

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.capture import named_inputs, trace
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.pruning.apply import KEPT_CHANNELS
from fxcomp.runtime.distillation import DistillObjective, DistillOptions, report_rows
from fxcomp.runtime.training import LoopOptions, TrainOptions, fit

__all__ = ["DistillPassOptions", "distill"]


@dataclass(frozen=True)
class DistillPassOptions:
    """``distill``'s options: the teacher, the data and how to train on it."""

    teacher: nn.Module
    data: Iterable[Any]
    options: DistillOptions


def distill_student(
    gm: GraphModule, ctx: CompileContext, *, what: DistillPassOptions
) -> PassResult:
    """Train ``gm`` against the teacher on the data (module docstring)."""
    teacher = trace(what.teacher, named_inputs(gm, ctx.config.example_inputs))
    objective = DistillObjective(gm, teacher, what.options, KEPT_CHANNELS.get(gm, {}))
    versions = [p._version for p in gm.parameters()]
    history = fit(objective, gm, what.data, what.options.training, desc="distill")
    ctx.state.report.tables["distill"] = report_rows(history)
    modified = [p._version for p in gm.parameters()] != versions
    return PassResult(gm, modified=modified)


def distill(
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    epochs: int = 3,
    lr: float | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    features: Mapping[str, str] | None = None,
    feature_weight: float = 1.0,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    **loop: Unpack[LoopOptions],
) -> Pass:
    """Distil ``teacher`` into the graph on ``data`` for ``epochs`` (module docstring).

    ``loss`` is the hard-label loss (cross-entropy); ``features`` maps student node names to
    teacher node names. ``lr=None`` (the default) finds Adam's learning rate by a short range
    test. The loop's keywords (``LoopOptions``): ``optimizer`` makes the optimizer from a
    parameter list (Adam at ``lr`` by default); ``validation`` data and
    ``metric`` keep the best epoch; ``callback(epoch, gm, figures)``; ``seed``;
    ``progress``.

    Example::

        passes=[fuse(), prune(0.5), distill(model, batches, epochs=2, features={"add": "add"})]
    """
    training = TrainOptions.of("distill", epochs, lr, loop)
    options = DistillOptions(
        training, temperature, alpha, dict(features or {}), feature_weight, loss
    )
    options.check()
    what = DistillPassOptions(teacher, data, options)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return distill_student(gm, ctx, what=what)

    return Pass("distill", run, run_after=("prune",), run_before=("quantize",), options=what)
