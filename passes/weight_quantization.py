"""Weight-only quantization: ``Linear(x; W) -> WeightOnlyLinear(x; Q(W))``, int8 or int4.

Each Linear stores its weight in int8 per output channel (``bits=8``) or in 4-bit codes
per group of ``group_size`` input channels (``bits=4``) and computes through the CPU's
weight-only kernels (``fxcomp.nn.weight_only``); activations stay in floating point. It is
the compression that speeds up decoding a language model at batch 1, which is bound by
reading the weights. The codes come from one of three methods (``fxcomp.quant.weight_grid``):

- ``rtn``: each weight rounded to its nearest code. No data.
- ``gptq``: column by column with error feedback through the inverse Hessian of the
  layer's inputs measured on ``data``. Layers are taken in graph order, those reading one
  tensor together, each measured with the layers before it already quantized.
- ``awq``: a per-input-channel scale searched on ``data`` to protect the channels with
  large activations, then each group's range clipped by the factor that minimises its
  share of the output error on those rows, and rounding. The scale folds into the
  LayerNorm before the layers where ``fxcomp.nn.scaling`` finds one; otherwise the layer
  divides its input itself (``input_scale``, one multiply).

With ``bits=4`` and a ``target_sqnr`` (dB of the graph's output against float, on
``data``), each Linear takes 4 or 8 bits: the layers whose rounding alone hurts the output
most take 8, as few as keep the output within the target (``fxcomp.quant.weight_bits``);
``report.tables["weight_bits"]`` ranks them.

The language model's head (the Linear whose output is the graph's output) stays float
unless ``lm_head=True``; with ``embeddings=True`` every ``nn.Embedding`` is stored the same
way (``WeightOnlyEmbedding``: rounded to nearest whatever the method, as a lookup has no
inputs to weigh its error by, and dequantized row by row when read); ``skip`` names other
layers to leave. ``report.tables
["quantize_weights"]`` gives each layer's method, weight SQNR, bytes and whether a kernel
or the dequantizing fallback computes it.

Example::

    passes=[quantize_weights(bits=4, group_size=128, method="gptq", data=batches)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from tqdm import tqdm

from fxcomp.ir.errors import InputError, did_you_mean
from fxcomp.ir.graph import replace_module
from fxcomp.nn.scaling import rescale_, scale_pairs
from fxcomp.nn.weight_only import GROUP_SIZES, WeightOnlyEmbedding, WeightOnlyLinear
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.quant.weight_bits import choose_bits
from fxcomp.quant.weight_grid import WeightGrid, awq_scale, clipped, gptq, rtn
from fxcomp.runtime.parity import sqnr
from fxcomp.runtime.training import split_batch

__all__ = ["WeightOnlyOptions", "quantize_weights"]

METHODS = ("rtn", "gptq", "awq")
_AWQ_ROWS = 4096  # the input rows kept per layer group for the AWQ search
_SEARCH_BATCHES = 8  # the batches target_sqnr measures the layers on


@dataclass(frozen=True)
class WeightOnlyOptions:
    """Bits (8 or 4), the 4-bit group size, the method and its data, and the layers left."""

    bits: int = 8
    group_size: int = 128
    method: str = "rtn"
    data: Iterable[Any] | None = None
    skip: tuple[str, ...] = ()
    lm_head: bool = False
    act_order: bool = False
    progress: bool = True
    embeddings: bool = False
    target_sqnr: float | None = None
    symmetric: bool = False


def _tables(gm: GraphModule, options: WeightOnlyOptions) -> list[str]:
    """The embedding tables to quantize (``embeddings=True``), by name."""
    if not options.embeddings:
        return []
    return [
        str(node.target)
        for node in gm.graph.find_nodes(op="call_module")
        if type(table := gm.get_submodule(str(node.target))) is nn.Embedding
        and table.max_norm is None
        and str(node.target) not in options.skip
    ]


def _layers(gm: GraphModule, options: WeightOnlyOptions) -> list[list[Node]]:
    """The Linear calls to quantize, in groups that read one tensor, in graph order."""
    kinds = (nn.Linear, nn.Embedding) if options.embeddings else nn.Linear
    names = {name for name, m in gm.named_modules() if isinstance(m, kinds)}
    unknown = [name for name in options.skip if name not in names]
    if unknown:
        what = "a Linear or Embedding layer" if options.embeddings else "a Linear layer"
        raise InputError(
            f"skip names '{unknown[0]}', which is not {what}",
            hint=did_you_mean(unknown[0], names, "see fxcomp dump MODEL"),
        )
    output = next(iter(gm.graph.find_nodes(op="output")))
    groups: dict[Node, list[Node]] = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if type(gm.get_submodule(str(node.target))) is not nn.Linear:
            continue
        if str(node.target) in options.skip or (output in node.users and not options.lm_head):
            continue
        groups.setdefault(node.args[0], []).append(node)
    return list(groups.values())


def _check(
    gm: GraphModule, groups: list[list[Node]], tables: list[str], options: WeightOnlyOptions
) -> None:
    """Refuse, before any work, a group size that does not divide a layer's input width (an
    embedding's width)."""
    if options.bits == 8:
        return
    widths = [
        (str(n.target), gm.get_submodule(str(n.target)).in_features) for g in groups for n in g
    ]
    widths += [(name, gm.get_submodule(name).embedding_dim) for name in tables]
    for name, width in widths:
        if width % options.group_size:
            fits = [g for g in GROUP_SIZES if width % g == 0]
            raise InputError(
                f"group size {options.group_size} does not divide the "
                f"{width} inputs of layer '{name}'",
                hint=f"use group_size={fits[-1]}" if fits else f"skip=['{name}']",
            )


def _watch(gm: GraphModule, group: list[Node], batches: list[tuple[Any, ...]], record: Any) -> None:
    """Run ``batches`` through ``gm`` calling ``record(rows)`` with the input rows the first
    layer of ``group`` reads (all of them read the same)."""
    layer = gm.get_submodule(str(group[0].target))

    def hook(_: Any, args: tuple[Any, ...]) -> None:
        record(args[0].detach().reshape(-1, layer.in_features).float())

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for inputs in batches:
                gm(*inputs)
    finally:
        handle.remove()


def _hessian(gm: GraphModule, group: list[Node], batches: list[tuple[Any, ...]]) -> torch.Tensor:
    width = gm.get_submodule(str(group[0].target)).in_features
    hessian, seen = torch.zeros(width, width, dtype=torch.float64), 0

    def record(rows: torch.Tensor) -> None:
        nonlocal hessian, seen
        rows = rows.double()
        hessian = hessian * (seen / (seen + len(rows))) + rows.T @ rows * (2 / (seen + len(rows)))
        seen += len(rows)

    _watch(gm, group, batches, record)
    return hessian


def _sample_rows(
    gm: GraphModule, group: list[Node], batches: list[tuple[Any, ...]]
) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    _watch(gm, group, batches, rows.append)
    stacked = torch.cat(rows)
    keep = torch.randperm(len(stacked), generator=torch.Generator().manual_seed(0))[:_AWQ_ROWS]
    return stacked[keep]


def _awq(
    gm: GraphModule, group: list[Node], rows: torch.Tensor, grid: WeightGrid
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Search the group's AWQ scale ``s``; fold it into the LayerNorm before the group where
    there is one, else have the layers apply it. Returns (the input scale the layers apply,
    or None where it was folded; the rows as the scaled layers read them)."""
    layers = [gm.get_submodule(str(n.target)) for n in group]
    scale = awq_scale([layer.weight.detach() for layer in layers], rows, grid)
    names = {str(n.target) for n in group}
    pair = next((p for p in scale_pairs(gm, norms=True) if set(p.consumers) == names), None)
    input_scale = None
    if pair is not None:
        rescale_(gm, pair, scale)  # the norm's output divided, the layers' columns multiplied
    else:
        with torch.no_grad():
            for layer in layers:
                layer.weight.mul_(scale)
        input_scale = 1 / scale
    return input_scale, rows / scale


def _bits(
    gm: GraphModule,
    ctx: CompileContext,
    groups: list[list[Node]],
    batches: list[tuple[Any, ...]],
    options: WeightOnlyOptions,
) -> dict[str, int]:
    """Each layer's bits: ``options.bits``, or with a ``target_sqnr`` those ``choose_bits``
    picks (its table in the report; a note where the target was out of reach)."""
    nodes = [node for group in groups for node in group]
    if options.target_sqnr is None:
        return {str(node.target): options.bits for node in nodes}
    names = [str(node.target) for node in nodes]
    bits, table, reached = choose_bits(
        gm, names, batches[:_SEARCH_BATCHES], options.target_sqnr, _int4(options)
    )
    ctx.state.report.tables["weight_bits"] = table
    if reached < options.target_sqnr:
        ctx.explain(
            nodes[0],
            "target_sqnr",
            f"every layer at int8 keeps the output at {reached:.1f} dB of float, below the "
            f"target {options.target_sqnr} dB: all layers take int8",
        )
    return bits


def quantize_layer_weights(
    gm: GraphModule, ctx: CompileContext, *, options: WeightOnlyOptions
) -> PassResult:
    """Quantize the weights of ``gm``'s Linear layers (module docstring)."""
    groups, tables = _layers(gm, options), _tables(gm, options)
    _check(gm, groups, tables, options)
    batches: list[tuple[Any, ...]] = []
    if options.method != "rtn" or options.target_sqnr is not None:
        data = options.data if options.data is not None else ctx.config.calibration_data
        if data is None:
            needs = "target_sqnr" if options.method == "rtn" else f"method '{options.method}'"
            raise InputError(
                f"{needs} needs data to measure the layers on",
                hint="pass data=batches (or calibration_data= to compile), or method='rtn'",
            )
        count = len(gm.graph.find_nodes(op="placeholder"))
        batches = [split_batch(b, count, i)[0] for i, b in enumerate(data)]
    bits = _bits(gm, ctx, groups, batches, options)
    rows = []
    progress = tqdm(
        groups,
        desc=f"quantize_weights {options.method}",
        unit="group",
        disable=not options.progress or None,
    )
    for group in progress:  # the layers of a group read one tensor: one input width
        width = gm.get_submodule(str(group[0].target)).in_features
        grids = {8: WeightGrid(8, width), 4: _int4(options)}
        grid = grids[min(bits[str(n.target)] for n in group)]  # what AWQ searches for
        if options.method == "gptq":
            hessian = _hessian(gm, group, batches)
        input_scale = None
        if options.method == "awq":
            input_scale, scaled_rows = _awq(gm, group, _sample_rows(gm, group, batches), grid)
        for node in group:
            name = str(node.target)
            layer = gm.get_submodule(name)
            weight = layer.weight.detach().float()
            grid = grids[bits[name]]
            if options.method == "gptq":
                codes, scale, minimum = gptq(weight, hessian, grid, act_order=options.act_order)
            elif options.method == "awq":
                codes, scale, minimum = clipped(weight, scaled_rows, grid)
            else:
                codes, scale, minimum = rtn(weight, grid)
            new = WeightOnlyLinear.from_codes(
                layer,
                codes,
                scale,
                minimum,
                bits=grid.bits,
                group_size=grid.group_size,
                input_scale=input_scale,
            )
            replace_module(gm, name, new)
            compute = "kernel" if new.kernel else "dequantize"
            rows.append(_row(name, options.method, grid, weight, new, compute))
    for name in tables:
        table = gm.get_submodule(name)
        weight = table.weight.detach().float()
        grid = WeightGrid(8, weight.shape[1]) if options.bits == 8 else _int4(options)
        codes, scale, minimum = rtn(weight, grid)
        new = WeightOnlyEmbedding.from_codes(
            table, codes, scale, minimum, bits=options.bits, group_size=grid.group_size
        )
        replace_module(gm, name, new)
        rows.append(_row(name, "rtn", grid, weight, new, "lookup"))
    if rows:
        ctx.state.report.tables["quantize_weights"] = rows
    return PassResult(gm, modified=bool(rows))


def _int4(options: WeightOnlyOptions) -> WeightGrid:
    return WeightGrid(4, options.group_size, options.symmetric)


def _row(
    name: str, method: str, grid: WeightGrid, weight: torch.Tensor, new: nn.Module, compute: str
) -> dict[str, Any]:
    """The report's row for one quantized layer."""
    return {
        "layer": name,
        "method": method,
        "bits": grid.bits,
        "group": grid.group_size,
        "weight_sqnr_db": f"{sqnr(weight, new.dequantized_weight()):.1f}",
        "bytes": new.storage_bytes(),
        "float32_bytes": 4 * weight.numel(),
        "compute": compute,
    }


def quantize_weights(
    bits: int = 8,
    group_size: int = 128,
    method: str = "rtn",
    data: Iterable[Any] | None = None,
    *,
    skip: Iterable[str] = (),
    lm_head: bool = False,
    embeddings: bool = False,
    target_sqnr: float | None = None,
    act_order: bool = False,
    symmetric: bool = False,
    progress: bool = True,
) -> Pass:
    """Store Linear weights in int8 per channel or int4 per group, computed with the CPU's
    weight-only kernels; ``method`` rtn, gptq or awq (module docstring). ``symmetric`` puts
    int4 codes around zero (-8..7, no minimum of their own): what ``backend="executorch"``
    needs for XNNPACK's groupwise linear, at some cost in error.

    Example::

        passes=[quantize_weights(bits=4, group_size=128, method="awq", data=batches)]
    """
    if bits not in (8, 4):
        raise InputError(f"quantize_weights takes bits=8 or bits=4, not {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise InputError(
            f"quantize_weights: group_size {group_size} is not one the int4 kernel takes",
            hint=f"use one of {', '.join(map(str, GROUP_SIZES))}",
        )
    if target_sqnr is not None and bits != 4:
        raise InputError(
            "quantize_weights: target_sqnr chooses each layer's bits between 4 and 8",
            hint="give bits=4 with it",
        )
    if method not in METHODS:
        raise InputError(
            f"quantize_weights: unknown method '{method}'", hint=f"use {', '.join(METHODS)}"
        )
    options = WeightOnlyOptions(
        bits,
        group_size,
        method,
        data,
        tuple(skip),
        lm_head,
        act_order,
        progress,
        embeddings,
        target_sqnr,
        symmetric,
    )

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return quantize_layer_weights(gm, ctx, options=options)

    return Pass("quantize_weights", run, run_after=("fuse", "prune", "distill"), options=options)
