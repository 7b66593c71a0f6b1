"""Knowledge distillation: train the graph (the student) to match a teacher model.

``student(x) -> student'(x)``, trained on ``data`` to minimise, per batch::

    alpha * T^2 * KL(softmax(teacher(x) / T) || softmax(student(x) / T))
    + (1 - alpha) * CE(student(x), label)            (batches that carry labels)
    + feature_weight * sum over ``features`` of MSE(student node, teacher node)

``features`` pairs FX node names, student's to teacher's (``fxcomp dump`` shows both). A
student layer that fxcomp pruned is compared with the teacher's kept channels directly
(``prune`` records them); any other difference in the channel axis gets a learned 1x1
adapter (a Linear over the channels) that is trained along and then dropped. Pairs that do
not exist or cannot be matched are refused before training starts. The teacher is traced
on a deep copy: the model given is never changed. Progress shows loss and throughput;
Adam at ``lr`` decays on a cosine over the whole run (unless an ``optimizer`` is given);
``callback(epoch, student, figures)`` runs after each epoch; with ``validation`` data the
student's best epoch by ``metric`` (top-1 accuracy by default) is kept.

Example::

    passes=[fuse(), prune(0.5), distill(model, train_batches, epochs=3, validation=val)]
"""

from __future__ import annotations

import copy
import difflib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node
from tqdm import tqdm

from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.passes.calibration import split_batch
from fxcomp.passes.pruning import KEPT_CHANNELS
from fxcomp.trace import trace

__all__ = ["DistillOptions", "distill", "distill_student", "top1_accuracy"]

log = logging.getLogger(__name__)

Metric = Callable[[Callable[..., Any], Iterable[Any]], float]
Callback = Callable[[int, GraphModule, dict[str, float]], None]


def _split(batch: Any, count: int, index: int) -> tuple[tuple[Any, ...], Any]:
    """(inputs, label or None) of a batch: a tensor, inputs, or (inputs..., label)."""
    inputs, rest = split_batch(batch, count, index, "distillation")
    if len(rest) > 1:
        raise InputError(
            f"distillation batch {index} has {count + len(rest)} items; the model takes "
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


@dataclass(frozen=True)
class DistillOptions:
    """What the student is trained on and how the terms of the loss are weighed."""

    epochs: int = 3
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.7
    features: Mapping[str, str] = field(default_factory=dict)
    feature_weight: float = 1.0
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"distill epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0 or not self.temperature > 0:
            raise InputError("distill lr and temperature must be positive")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"distill alpha must be in [0, 1], got {self.alpha}")


def _tapped(gm: GraphModule, names: list[str]) -> GraphModule:
    """``gm`` (sharing its modules) returning ``(output, *values of names)``."""
    graph = Graph()
    env: dict[Node, Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {node.name: env[node] for node in gm.graph.nodes if node in env}
    graph.output((out, *(by_name[n] for n in names)))
    return GraphModule(gm, graph, "Tapped")


def _node(gm: GraphModule, name: str, whose: str) -> Node:
    nodes = {n.name: n for n in gm.graph.nodes if n.op not in ("output", "placeholder")}
    if name not in nodes:
        close = difflib.get_close_matches(name, nodes, n=3)
        raise InputError(
            f"distill features: the {whose} has no node '{name}'"
            + (f" (close: {', '.join(close)})" if close else ""),
            hint=f"fxcomp dump shows the {whose}'s node names",
        )
    return nodes[name]


def _shape(node: Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


class _Pair(nn.Module):
    """Maps a student feature onto its teacher feature: kept channels, an adapter, or as is."""

    def __init__(self, student: Node, teacher: Node, kept: dict[str, tuple[int, list[int]]]):
        super().__init__()
        s, t = _shape(student), _shape(teacher)
        self.axis, self.adapter = 1, None
        self.index: torch.Tensor | None = None
        where = f"student '{student.name}' {s} and teacher '{teacher.name}' {t}"
        if s is None or t is None or len(s) != len(t) or len(s) < 2:
            raise InputError(f"distill features: {where} are not comparable tensors")
        differ = [i for i in range(1, len(s)) if s[i] != t[i]]
        if not differ:
            return
        record = kept.get(student.name)
        if record is not None and differ == [record[0]] and t[record[0]] > max(record[1]):
            self.axis = record[0]
            self.index = torch.tensor(record[1])
        elif differ == [1]:
            self.adapter = nn.Linear(s[1], t[1], bias=False)
        else:
            raise InputError(
                f"distill features: {where} differ beyond the channel axis",
                hint="pair nodes of the same spatial shape",
            )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            teacher = teacher.index_select(self.axis, self.index)
        elif self.adapter is not None:
            student = self.adapter(student.movedim(1, -1)).movedim(-1, 1)
        return F.mse_loss(student, teacher)


class _Distiller:
    """One training run: the tapped student and teacher, the feature pairs, the optimizer."""

    def __init__(
        self,
        gm: GraphModule,
        teacher: GraphModule,
        options: DistillOptions,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
        loss: Callable[[Any, Any], torch.Tensor] | None,
        batches_per_epoch: int | None,
    ) -> None:
        kept = gm.meta.get(KEPT_CHANNELS, {})
        self.pairs = nn.ModuleList(
            _Pair(_node(gm, s, "student"), _node(teacher, t, "teacher"), kept)
            for s, t in options.features.items()
        )
        self.student = _tapped(gm, list(options.features))
        self.teacher = _tapped(teacher, list(options.features.values()))
        with torch.random.fork_rng():
            torch.manual_seed(options.seed)
            self.pairs.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        params = [p for p in [*gm.parameters(), *self.pairs.parameters()] if p.requires_grad]
        self.optimizer = optimizer(params) if optimizer else torch.optim.Adam(params, options.lr)
        self.schedule = None
        if optimizer is None and batches_per_epoch:
            steps = options.epochs * batches_per_epoch
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, steps)
        self.hard_loss = loss or F.cross_entropy
        self.options = options
        self.inputs = len(gm.graph.find_nodes(op="placeholder"))

    def losses(self, inputs: tuple[Any, ...], label: Any) -> dict[str, torch.Tensor]:
        """The loss of one batch and its terms."""
        with torch.no_grad():
            t_out, *t_feats = self.teacher(*inputs)
        s_out, *s_feats = self.student(*inputs)
        temperature, zero = self.options.temperature, s_out.new_zeros(())
        kd = F.kl_div(
            F.log_softmax(s_out / temperature, -1),
            F.log_softmax(t_out / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        kd = kd * temperature**2
        hard = self.hard_loss(s_out, label) if label is not None else zero
        alpha = self.options.alpha if label is not None else 1.0
        terms = zip(self.pairs, s_feats, t_feats, strict=True)
        features = sum((pair(s, t) for pair, s, t in terms), zero)
        total = alpha * kd + (1 - alpha) * hard + self.options.feature_weight * features
        return {"loss": total, "kd": kd, "hard": hard, "features": features}

    def epoch(self, data: Iterable[Any], bar: Any) -> dict[str, float]:
        """Train one pass over ``data``; the mean of each loss term and the seconds taken."""
        totals = dict.fromkeys(("loss", "kd", "hard", "features"), 0.0)
        batches, samples, start = 0, 0, time.perf_counter()
        for index, batch in enumerate(data):
            inputs, label = _split(batch, self.inputs, index)
            terms = self.losses(inputs, label)
            self.optimizer.zero_grad()
            terms["loss"].backward()
            self.optimizer.step()
            if self.schedule is not None:
                self.schedule.step()
            for key, value in terms.items():
                totals[key] += value.item()
            batches += 1
            samples += len(inputs[0]) if isinstance(inputs[0], torch.Tensor) else 1
            rate = samples / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}", samples_s=f"{rate:.0f}")
        if not batches:
            raise InputError("the distillation data is empty", hint="pass at least one batch")
        figures = {key: value / batches for key, value in totals.items()}
        figures["seconds"] = time.perf_counter() - start
        return figures


def distill_student(
    gm: GraphModule,
    ctx: CompileContext,
    *,
    teacher: nn.Module,
    data: Iterable[Any],
    options: DistillOptions = DistillOptions(),
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    validation: Iterable[Any] | None = None,
    metric: Metric = top1_accuracy,
    callback: Callback | None = None,
) -> PassResult:
    """Train ``gm`` against ``teacher`` on ``data`` (module docstring)."""
    options.check()
    if iter(data) is data:
        raise InputError("distill data is a one-pass iterator", hint="give a list or a DataLoader")
    per_epoch = len(data) if hasattr(data, "__len__") else None
    run = _Distiller(gm, trace(teacher, ctx.example_inputs), options, optimizer, loss, per_epoch)
    versions = [p._version for p in gm.parameters()]
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    rows = []
    epochs = range(1, options.epochs + 1)
    bar = tqdm(epochs, desc="distill", unit="epoch", disable=not options.progress or None)
    for epoch in bar:
        gm.train()
        figures = run.epoch(data, bar)
        gm.eval()
        if validation is not None:
            figures["metric"] = metric(gm, validation)
            if best is None or figures["metric"] > best[0]:
                best = (figures["metric"], copy.deepcopy(gm.state_dict()))
        rows.append({"epoch": epoch, **{k: f"{v:.4g}" for k, v in figures.items()}})
        log.info("distill epoch %d: %s", epoch, figures)
        if callback is not None:
            callback(epoch, gm, figures)
    if best is not None:
        gm.load_state_dict(best[1])
    ctx.report.tables["distill"] = rows
    modified = [p._version for p in gm.parameters()] != versions
    return PassResult(gm, modified=modified)


def distill(
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.7,
    features: Mapping[str, str] | None = None,
    feature_weight: float = 1.0,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    validation: Iterable[Any] | None = None,
    metric: Metric = top1_accuracy,
    callback: Callback | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Pass:
    """Distil ``teacher`` into the graph on ``data`` for ``epochs`` (module docstring).

    ``optimizer`` makes the optimizer from a parameter list (Adam at ``lr`` by default);
    ``loss`` is the hard-label loss (cross-entropy); ``features`` maps student node names to
    teacher node names.

    Example::

        passes=[fuse(), prune(0.5), distill(model, batches, epochs=2, features={"add": "add"})]
    """
    options = DistillOptions(
        epochs, lr, temperature, alpha, dict(features or {}), feature_weight, seed, progress
    )
    options.check()

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return distill_student(
            gm,
            ctx,
            teacher=teacher,
            data=data,
            options=options,
            optimizer=optimizer,
            loss=loss,
            validation=validation,
            metric=metric,
            callback=callback,
        )

    return Pass("distill", run, run_after=("prune",), run_before=("quantize",))
