"""Channel pruning: remove whole channel sets from every layer they pass through.

``Conv(x)[C] -> Conv'(x)[C - k]`` and every consumer with it. The channel dependency graph
(``fxcomp.pruning.graph``, one rule per op kind, ``fxcomp.pruning.rules``) says which
channels are tied; the plan (``fxcomp.pruning.plan``) ranks each prunable group's channel
sets by importance and chooses the lowest; applying it (``fxcomp.pruning.apply``) slices
every Conv, Linear, BatchNorm and GroupNorm for real and rewrites the sizes the graph
bakes in. The result is an ordinary smaller model. Groups that touch the model's inputs or
outputs, or an op the graph does not know, keep all their channels and the report says
why; ``channel_rules`` teaches pruning an op it does not know.

Example::

    fxcomp.compile(model, x, passes=[fxcomp.passes.prune(0.5, ignore=["layer4.*"])])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.pruning.apply import prune_channels
from fxcomp.pruning.plan import Importance, PruneOptions
from fxcomp.pruning.rules import ChannelRule

__all__ = ["prune"]


def prune(
    ratio: float = 0.5,
    *,
    importance: str | Importance = "l2",
    scope: str = "local",
    ignore: Sequence[str] = (),
    ratios: Mapping[str, float] | None = None,
    round_to: int | None = None,
    steps: int = 1,
    min_channels: int = 1,
    data: Iterable[Any] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    between_steps: Callable[[GraphModule, int], None] | None = None,
    seed: int = 0,
    channel_rules: Mapping[Any, ChannelRule] | None = None,
) -> Pass:
    """Remove ``ratio`` of the channels of every prunable group, ranked by ``importance``
    (``"l2"``, ``"l1"``, ``"taylor"``, ``"bn_scale"``, ``"random"``, or a function from a
    weight to per-element scores).

    ``ignore`` and the keys of ``ratios`` are module or node names, shell patterns allowed
    (``"layer4.*"``): a group with an ignored member keeps its channels, a group with a
    member named in ``ratios`` loses that share instead. ``round_to`` keeps channel counts
    multiples of N. ``steps`` prunes in rounds, re-ranking after each and calling
    ``between_steps(gm, step)`` (fine-tune there). ``data`` (batches of ``(inputs,
    targets)``) and ``loss`` feed the ``"taylor"`` importance. ``channel_rules`` maps an op
    (a function, a method name, or a module class) to a rule ``rule(graph, node)`` that ties
    its channels (``fxcomp.pruning.rules``).

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.prune(0.5, ignore=["layer4.*"])])
    """
    options = PruneOptions(
        ratio,
        importance,
        scope,
        tuple(ignore),
        dict(ratios or {}),
        round_to,
        min_channels,
        seed,
        data,
        loss,
        steps,
        between_steps,
        dict(channel_rules or {}),
    )
    options.check()

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return prune_channels(gm, ctx, options=options)

    return Pass("prune", run, run_before=("quantize", "qat"), options=options)
