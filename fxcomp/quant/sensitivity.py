"""Quantization sensitivity per layer: which layers lose the most when quantized, and why.

``measure_layers(floating, example_inputs, data, config)`` quantizes copies of a fused float
graph with ``quantize``'s own steps (observe, calibrate, freeze, through the pass manager)
and measures, on the data, for every Conv/Linear that full quantization quantizes, the
output's SQNR against float

* ``sqnr_alone``: when only this layer is quantized (as a quantized kernel runs it: its
  weight, its input on the grid observed there, its output on its own grid);
* ``sqnr_without``: when everything but this layer is quantized (``skip=[layer]``);

and the statistics users look at to see why: the weight's range, mean, standard deviation
and the share of outliers beyond 6 sigma (with the weight's own SQNR on its grid); the same
for the layer's input and output activations, the range quantization chose for each, and
the share of values that range clips. ``Analysis.layers`` lists them most harmful first (lowest
``sqnr_alone``). ``fxcomp.analyze`` runs it on a model (fused first); mixed precision ranks
layers by it.

Example::

    result = measure_layers(fused, (x,), calibration_batches, QuantConfig("x86"))
    table = result.table()
    result.to_dict()["layers"][0]["name"]   # the layer that hurts most
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from matplotlib.figure import Figure
from tabulate import tabulate
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import module_of
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.ops import QUANT_KIND, op_name, tensor_inputs
from fxcomp.quant.pipeline import quantize_copy
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer, fake_quantize, grid_of
from fxcomp.runtime.parity import sqnr
from fxcomp.runtime.training import split_batch

__all__ = [
    "Analysis",
    "LayerAnalysis",
    "TensorStats",
    "flat_outputs",
    "input_batches",
    "measure_layers",
]

OUTLIER_SIGMAS = 6.0
# Kinds of quantized op without weights that have an output grid of their own
# (``fxcomp.quant.ops``): what ``measure_layers(ops=True)`` ranks besides Conv/Linear.
_OPS = ("binary", "cat", "hardswish", "fixed", "pooled")


@dataclass(frozen=True)
class TensorStats:
    """Range, moments and outliers of a tensor (or of every batch of an activation)."""

    min: float
    max: float
    mean: float
    std: float
    outliers: float  # share of values beyond OUTLIER_SIGMAS standard deviations of the mean
    grid_min: float | None = None  # the range the quantizer chose, where there is one
    grid_max: float | None = None
    clipped: float | None = None  # share of values outside that range


_UNMEASURED = TensorStats(*([math.nan] * 5))


@dataclass(frozen=True)
class LayerAnalysis:
    """One quantized layer: its harm and its statistics."""

    name: str
    kind: str
    sqnr_alone: float
    sqnr_without: float
    weight_sqnr: float
    weight: TensorStats
    input: TensorStats
    output: TensorStats


@dataclass
class Analysis:
    """The per-layer figures, most harmful first, and the whole model's SQNR."""

    engine: str
    observer: str
    model_sqnr: float
    layers: list[LayerAnalysis] = field(default_factory=list)
    graph_order: list[str] = field(default_factory=list)
    reference: GraphModule | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (infinities as None)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return clean(
            {
                "engine": self.engine,
                "observer": self.observer,
                "model_sqnr_db": self.model_sqnr,
                "layers": [asdict(layer) for layer in self.layers],
            }
        )

    def table(self) -> str:
        """The ranking as a text table."""
        rows = [
            [
                layer.name,
                f"{layer.sqnr_alone:.1f}",
                f"{layer.sqnr_without:.1f}",
                f"{layer.weight_sqnr:.1f}",
                f"{layer.weight.outliers:.2%}",
                *_range_columns(layer.input),
                *_range_columns(layer.output),
            ]
            for layer in self.layers
        ]
        headers = [
            "layer (most harmful first)",
            "SQNR alone dB",
            "SQNR all but it dB",
            "weight SQNR dB",
            "weight outliers",
            "input range",
            "input grid",
            "input clipped",
            "output range",
            "output grid",
            "output clipped",
        ]
        return f"model SQNR {self.model_sqnr:.1f} dB\n" + tabulate(rows, headers=headers)

    def histogram_figure(self, count: int = 3) -> Figure:
        """Weight histograms, float and on the INT8 grid, of the ``count`` most harmed
        layers."""
        return _weight_histograms(self, count)

    def figure(self) -> Figure:
        """Bars of each layer's SQNR alone and with all but it quantized, in graph order."""
        layers = sorted(self.layers, key=lambda layer: self.graph_order.index(layer.name))
        figure = Figure(figsize=(max(6.0, 0.35 * len(layers)), 4.0))
        axes = figure.subplots()
        x = range(len(layers))
        axes.bar(
            [i - 0.2 for i in x],
            [_finite(la.sqnr_alone) for la in layers],
            0.4,
            label="only this layer quantized",
        )
        axes.bar(
            [i + 0.2 for i in x],
            [_finite(la.sqnr_without) for la in layers],
            0.4,
            label="all but this layer quantized",
        )
        axes.axhline(self.model_sqnr, color="black", linewidth=0.8, label="all quantized")
        axes.set_xticks(list(x), [la.name for la in layers], rotation=90, fontsize=7)
        axes.set_ylabel("output SQNR vs float (dB)")
        axes.set_title(f"Per-layer quantization error ({self.engine}, {self.observer})")
        axes.legend(fontsize=7)
        return figure


def _weight_histograms(analysis: Analysis, count: int) -> Figure:
    layers = analysis.layers[:count]
    figure = Figure(figsize=(4.0 * len(layers), 3.2))
    for axes, layer in zip(figure.subplots(1, len(layers), squeeze=False)[0], layers, strict=True):
        unit = analysis.reference.get_submodule(layer.name)
        weight = unit.weighted.weight.detach()
        rounded = fake_quantize(weight, unit.weight_scale, unit.weight_zero_point, unit.scheme)
        axes.hist(weight.flatten().numpy(), bins=120, alpha=0.6, label="float")
        axes.hist(rounded.flatten().numpy(), bins=120, alpha=0.6, label="INT8 grid")
        axes.set_yscale("log")
        axes.set_title(f"{layer.name}: alone {layer.sqnr_alone:.1f} dB", fontsize=9)
        axes.legend(fontsize=7)
    figure.suptitle("Weights of the most harmed layers, before and after quantization")
    return figure


def _range_columns(stats: TensorStats) -> list[str]:
    if stats.grid_min is None:
        return [f"{stats.min:.3g}..{stats.max:.3g}", "float", "-"]
    return [
        f"{stats.min:.3g}..{stats.max:.3g}",
        f"{stats.grid_min:.3g}..{stats.grid_max:.3g}",
        f"{stats.clipped:.3%}",
    ]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 100.0


def _stats(values: torch.Tensor, grid: tuple[float, float] | None = None) -> TensorStats:
    values = values.detach().float().flatten()
    mean, std = values.mean().item(), values.std().item() if values.numel() > 1 else 0.0
    outliers = ((values - mean).abs() > OUTLIER_SIGMAS * std).float().mean().item() if std else 0.0
    clipped = None
    if grid is not None:
        clipped = ((values < grid[0]) | (values > grid[1])).float().mean().item()
    return TensorStats(
        values.min().item(),
        values.max().item(),
        mean,
        std,
        outliers,
        grid[0] if grid else None,
        grid[1] if grid else None,
        clipped,
    )


def flat_outputs(gm: nn.Module, batches: list[tuple[Any, ...]]) -> torch.Tensor:
    """Every output of ``gm`` on every batch of inputs, flattened into one float tensor."""
    with torch.no_grad():
        outs = [gm(*inputs) for inputs in batches]
    return torch.cat(
        [torch.cat([t.detach().float().flatten() for t in tree_leaves(o)]) for o in outs]
    )


def input_batches(gm: GraphModule, data: Iterable[Any]) -> list[tuple[Any, ...]]:
    """The model inputs of each batch of ``data`` (labels dropped)."""
    count = len(gm.graph.find_nodes(op="placeholder"))
    batches = [split_batch(b, count, i)[0] for i, b in enumerate(data)]
    if not batches:
        raise InputError("analysis needs at least one batch of data")
    return batches


def measure_layers(
    floating: GraphModule,
    example_inputs: tuple[Any, ...],
    data: Iterable[Any],
    config: QuantConfig,
    *,
    eval_data: Iterable[Any] | None = None,
    statistics: bool = True,
    ops: bool = False,
) -> Analysis:
    """The analysis of ``floating`` (a fused float graph with shapes), calibrated on
    ``data`` and measured on ``eval_data`` (``data`` by default); without ``statistics``,
    the ranking only: ``sqnr_alone`` (module docstring), the rest NaN. With ``ops``, the
    quantized ops that have a grid of their own (adds, multiplies, cat, pooling on its own
    grid...) are ranked too, named as ``skip`` takes them (module name, or graph node name
    for a function), with their SQNR figures only.

    Example::

        analysis = measure_layers(fused, (x,), batches, QuantConfig("x86"))
    """
    data = list(data)
    batches = input_batches(floating, eval_data if eval_data is not None else data)
    expected = flat_outputs(floating, batches)

    def figure(skip: tuple = (), only: str | None = None) -> tuple[float, GraphModule]:
        trial = replace(config, skip=(*config.skip, *skip))
        only_nodes = None if only is None else (only,)
        reference = quantize_copy(floating, trial, data, example_inputs, only_nodes=only_nodes)
        return sqnr(expected, flat_outputs(reference, batches)), reference

    model_sqnr, full = figure()
    layers = []
    for node in full.graph.nodes:
        layer = module_of(full, node)
        weighted = isinstance(layer, QuantizedWeightLayer)
        if not weighted and not (ops and node.meta.get(QUANT_KIND) in _OPS):
            continue
        name = str(node.target) if node.op == "call_module" else node.name  # as skip takes it
        alone = figure(only=node.name)[0]
        without = figure(skip=(name,))[0] if statistics else math.nan
        if not weighted:  # an op: its SQNR figures only
            kind = node.meta[QUANT_KIND] if node.op == "call_module" else op_name(node)
            layers.append(LayerAnalysis(name, kind, alone, without, math.nan, *[_UNMEASURED] * 3))
            continue
        weight = layer.weighted.weight.detach()
        rounded = fake_quantize(weight, layer.weight_scale, layer.weight_zero_point, layer.scheme)
        grids = (grid_of(full, tensor_inputs(node)[0]), _output_grid(full, node))
        activations = _activation_stats(floating, name, batches, grids) if statistics else None
        layers.append(
            LayerAnalysis(
                name=name,
                kind=type(layer.weighted).__name__,
                sqnr_alone=alone,
                sqnr_without=without,
                weight_sqnr=sqnr(weight, rounded),
                weight=_stats(weight) if statistics else _UNMEASURED,
                input=activations[0] if activations else _UNMEASURED,
                output=activations[1] if activations else _UNMEASURED,
            )
        )
    if not layers:
        raise InputError(
            "no layer of the model is quantized", hint="analysis needs Conv or Linear layers"
        )
    order = [layer.name for layer in layers]
    layers.sort(key=lambda la: la.sqnr_alone)
    return Analysis(config.engine, config.observer, model_sqnr, layers, order, full)


def _output_grid(gm: GraphModule, node: Node) -> QuantDequant | None:
    steps = [module_of(gm, user) for user in node.users]
    return next((m for m in steps if isinstance(m, QuantDequant)), None)


def _activation_stats(
    floating: GraphModule,
    name: str,
    batches: list[tuple[Any, ...]],
    grids: tuple[QuantDequant | None, QuantDequant | None],
) -> tuple[TensorStats, TensorStats]:
    """Statistics of what the float layer ``name`` receives and returns over ``batches``,
    each against the grid quantization puts it on."""
    seen: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    module = floating.get_submodule(name)
    hooks = [
        module.register_forward_pre_hook(lambda m, args: seen[0].append(args[0].flatten())),
        module.register_forward_hook(lambda m, args, out: seen[1].append(out.flatten())),
    ]
    try:
        flat_outputs(floating, batches)
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(
        _stats(torch.cat(values), grid.bounds() if grid is not None else None)
        for values, grid in zip(seen, grids, strict=True)
    )
