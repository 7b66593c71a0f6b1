"""What pruning did, per layer, and the picture users check a pruning decision against.

``layer_table`` lists every Conv, Linear and norm layer with its channels and, given a
plan, the importance of its output channels and why a kept layer was kept;
``merge_tables`` puts a before and an after table side by side. ``importance_figure``
draws, for the largest groups, each channel set's importance as a bar, the removed ones
in red.

Example::

    plan = pruning_plan(gm, PruneOptions(0.5))
    rows = layer_table(gm, plan)
    png = png_bytes(lambda: importance_figure(plan))
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.graph import BATCHNORMS, module_of
from fxcomp.nn.fused import weighted_layer

if TYPE_CHECKING:
    from fxcomp.pruning.plan import Plan
    from fxcomp.pruning.ties import Group

__all__ = ["importance_figure", "layer_table", "merge_tables"]

_FIGURE_GROUPS = 12


def _channels(module: nn.Module) -> tuple[int | None, int]:
    layer = weighted_layer(module)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if layer is not None:
        return layer.in_channels, layer.out_channels
    if isinstance(module, nn.GroupNorm):
        return None, module.num_channels
    return None, module.num_features


def _importance(plan: Plan) -> dict[str, list[float]]:
    """Per value of every planned group: each channel's channel-set score."""
    scores = {}
    for group_plan in plan.plans:
        set_scores = torch.tensor(group_plan.scores)
        for value, labels in group_plan.group.members.items():
            scores[value] = set_scores[labels].tolist()
    return scores


def _status(plan: Plan, groups: dict[str, Group], value: str) -> str:
    group = groups.get(value)
    planned = next((p for p in plan.plans if p.group is group), None)
    if planned is not None:
        return f"{len(planned.removed)} of {group.sets} sets removed"
    if group is None:
        return "no channels"
    if group.blocked_by:
        return f"kept: {group.blocked_by[0]}" + (
            f" (+{len(group.blocked_by) - 1} more)" if len(group.blocked_by) > 1 else ""
        )
    return "kept: ignored or a single channel set" if group.sets > 1 else "kept"


def layer_table(gm: GraphModule, plan: Plan | None) -> list[dict[str, Any]]:
    """One row per Conv, Linear, BatchNorm and GroupNorm layer of ``gm``."""
    importance = _importance(plan) if plan is not None else {}
    groups = {v: g for g in plan.groups for v in g.values} if plan is not None else {}
    rows = []
    for node in gm.graph.find_nodes(op="call_module"):
        module = module_of(gm, node)
        if weighted_layer(module) is None and not isinstance(module, (*BATCHNORMS, nn.GroupNorm)):
            continue
        channels_in, channels_out = _channels(module)
        row: dict[str, Any] = {"layer": node.target, "type": type(module).__name__}
        row |= {"in": channels_in, "out": channels_out}
        if plan is not None:
            scores = importance.get(node.name)
            row["importance min/median/max"] = (
                f"{min(scores):.3g} / {statistics.median(scores):.3g} / {max(scores):.3g}"
                if scores
                else ""
            )
            row["status"] = _status(plan, groups, node.name)
        rows.append(row)
    return rows


def merge_tables(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict]:
    """``before``'s rows with channels shown as ``before -> after``."""
    now = {row["layer"]: row for row in after}
    merged = []
    for row in before:
        later = now.get(row["layer"], row)
        merged.append(
            row
            | {
                key: f"{row[key]} -> {later[key]}" if row[key] is not None else ""
                for key in ("in", "out")
            }
        )
    return merged


def importance_figure(plan: Plan) -> Figure:
    """Bars of channel-set importance for the largest planned groups; removed ones red."""
    shown = sorted(plan.plans, key=lambda p: -len(p.scores))[:_FIGURE_GROUPS]
    columns = 3 if len(shown) > 4 else max(1, len(shown))
    rows = max(1, -(-len(shown) // columns))
    figure = Figure(figsize=(5 * columns, 2.6 * rows))
    for i, group_plan in enumerate(shown):
        axes = figure.add_subplot(rows, columns, i + 1)
        removed = set(group_plan.removed)
        colors = ["tab:red" if k in removed else "tab:blue" for k in range(len(group_plan.scores))]
        axes.bar(range(len(group_plan.scores)), group_plan.scores, color=colors, width=1.0)
        values = group_plan.group.values
        more = f" +{len(values) - 1}" if len(values) > 1 else ""
        axes.set_title(
            f"{values[0]}{more}: {len(removed)}/{len(group_plan.scores)} removed", fontsize=9
        )
        axes.set_xlabel("channel set", fontsize=8)
        axes.set_ylabel("importance", fontsize=8)
        axes.tick_params(labelsize=7)
    if not shown:
        figure.add_subplot(1, 1, 1).text(0.5, 0.5, "no prunable group", ha="center")
    figure.suptitle("Channel importance before pruning (red: removed)")
    return figure
