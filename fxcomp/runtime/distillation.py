"""Knowledge distillation's objective: the loss a student graph minimises to match a teacher.

``student(x) -> student'(x)``, trained on ``data`` to minimise, per batch::

    alpha * T^2 * KL(softmax(teacher(x) / T) || softmax(student(x) / T))
    + (1 - alpha) * CE(student(x), label)            (batches that carry labels)
    + feature_weight * sum over ``features`` of MSE(student node, teacher node)

``features`` pairs FX node names, student's to teacher's (``fxcomp dump`` shows both). A
student layer that was pruned is compared with the teacher's kept channels directly (the
``kept`` record pruning leaves: value -> (axis, kept channels)); any other difference in the
channel axis gets a learned 1x1 adapter (a Linear over the channels) that is trained along
and then dropped. Pairs that do not exist or cannot be matched are refused before training
starts. ``fxcomp.passes.distill`` and ``qat(teacher=...)`` train with it.

Example::

    terms = DistillObjective(gm, teacher_gm, DistillOptions())((x,), y)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxcomp.ir.errors import InputError
from fxcomp.runtime.training import TrainOptions

__all__ = ["DistillObjective", "DistillOptions", "KeptChannels", "report_rows"]

# value -> (channel axis, the original channels it keeps), as pruning records it
KeptChannels = dict[str, tuple[int, list[int]]]


@dataclass(frozen=True)
class DistillOptions:
    """How the student trains and how the terms of the loss are weighed; ``loss`` is the
    hard-label loss (cross-entropy by default)."""

    training: TrainOptions = TrainOptions(epochs=3)
    temperature: float = 4.0
    alpha: float = 0.7
    features: Mapping[str, str] = field(default_factory=dict)
    feature_weight: float = 1.0
    loss: Callable[[Any, Any], torch.Tensor] | None = None

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        self.training.check("distill")
        if not self.temperature > 0:
            raise InputError(f"distill temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"distill alpha must be in [0, 1], got {self.alpha}")


def _tapped(gm: GraphModule, names: list[str]) -> GraphModule:
    """``gm`` (sharing its modules) returning ``(output, *values of names)``; of a model
    with several outputs (a captured ``ModelOutput``: logits first), the first."""
    graph = Graph()
    env: dict[Node, Node] = {}
    out = graph.graph_copy(gm.graph, env)
    while isinstance(out, tuple | list):
        out = out[0]
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

    def __init__(self, student: Node, teacher: Node, kept: KeptChannels):
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


class DistillObjective(nn.Module):
    """The loss of one batch (module docstring) and its terms; the teacher is held, not
    registered, so that only the student and the adapters train.

    Example::

        terms = DistillObjective(gm, teacher, options)((x,), y)   # {"loss": ..., "kd": ...}
    """

    def __init__(
        self,
        gm: GraphModule,
        teacher: GraphModule,
        options: DistillOptions,
        kept: KeptChannels | None = None,
    ) -> None:
        super().__init__()
        kept = kept or {}
        self.pairs = nn.ModuleList(
            _Pair(_node(gm, s, "student"), _node(teacher, t, "teacher"), kept)
            for s, t in options.features.items()
        )
        self.student = _tapped(gm, list(options.features))
        self._teacher = (_tapped(teacher, list(options.features.values())).requires_grad_(False),)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.training.seed)
            self.pairs.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        self.hard_loss = options.loss or F.cross_entropy
        self.options = options

    def forward(self, inputs: tuple[Any, ...], label: Any) -> dict[str, torch.Tensor]:
        teacher = self._teacher[0].eval()
        with torch.no_grad():
            t_out, *t_feats = teacher(*inputs)
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


def report_rows(history: list[dict[str, float]]) -> list[dict[str, Any]]:
    """One report row per epoch, figures to four significant digits."""
    return [
        {"epoch": epoch, **{k: f"{v:.4g}" for k, v in figures.items()}}
        for epoch, figures in enumerate(history, 1)
    ]
