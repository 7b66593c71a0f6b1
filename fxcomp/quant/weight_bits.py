"""Mixed weight-only precision: which layers take 4 bits and which 8, to an output target.

``choose_bits(gm, layers, batches, target_sqnr, int4)`` measures, on ``batches``, each
layer's sensitivity: the graph's output SQNR against float with that layer alone rounded to
the ``int4`` grid (round to nearest). Layers are then ranked most sensitive
first, and the fewest of them are put at int8 (the rest at int4) such that the whole graph,
every layer rounded, keeps its output within ``target_sqnr`` dB of float; that count is
found by bisection, taking the output SQNR as rising with each layer moved to int8. The
graph is left as it was. If even all-int8 misses the target, every layer is int8 and the
result says so.

Example::

    bits, rows, reached = choose_bits(gm, ["fc1", "fc2"], batches, 30.0, WeightGrid(4, 128))
    bits["fc1"]   # 8 or 4
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from fxcomp.ir.graph import replace_module
from fxcomp.nn.weight_only import WeightOnlyLinear
from fxcomp.quant.weight_grid import WeightGrid, rtn
from fxcomp.runtime.parity import sqnr

__all__ = ["choose_bits"]


def _rounded(layer: nn.Linear, bits: int, int4: WeightGrid) -> WeightOnlyLinear:
    grid = WeightGrid(8, layer.in_features) if bits == 8 else int4
    codes = rtn(layer.weight.detach().float(), grid)
    return WeightOnlyLinear.from_codes(layer, *codes, bits=bits, group_size=grid.group_size)


@contextlib.contextmanager
def _swapped(gm: GraphModule, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """``gm`` with ``layers`` in place of its own, put back on exit."""
    originals = {name: gm.get_submodule(name) for name in layers}
    try:
        for name, layer in layers.items():
            replace_module(gm, name, layer)
        yield
    finally:
        for name, layer in originals.items():
            replace_module(gm, name, layer)


def _outputs(gm: GraphModule, batches: list[tuple[Any, ...]]) -> torch.Tensor:
    """The graph's first output tensor (the logits of a language model) on every batch, as
    one flat tensor."""
    with torch.no_grad():
        outputs = [gm(*inputs) for inputs in batches]
    first = [next(t for t in tree_leaves(o) if isinstance(t, torch.Tensor)) for o in outputs]
    return torch.cat([t.detach().float().flatten() for t in first])


def choose_bits(
    gm: GraphModule,
    layers: list[str],
    batches: list[tuple[Any, ...]],
    target_sqnr: float,
    int4: WeightGrid,
) -> tuple[dict[str, int], list[dict[str, Any]], float]:
    """(bits per layer, one report row per layer, the output SQNR reached) (module
    docstring)."""
    reference = _outputs(gm, batches)
    originals = {name: gm.get_submodule(name) for name in layers}
    rounded = {b: {n: _rounded(m, b, int4) for n, m in originals.items()} for b in (4, 8)}
    alone = {}
    for name in layers:
        with _swapped(gm, {name: rounded[4][name]}):
            alone[name] = sqnr(reference, _outputs(gm, batches))
    ranked = sorted(layers, key=alone.__getitem__)  # most sensitive first

    def reached(count: int) -> float:
        eight = set(ranked[:count])
        chosen = {name: rounded[8 if name in eight else 4][name] for name in layers}
        with _swapped(gm, chosen):
            return sqnr(reference, _outputs(gm, batches))

    low, high = 0, len(layers)
    measured = {0: reached(0)}
    if measured[0] < target_sqnr:
        measured[high] = reached(high)
        while high - low > 1:
            middle = (low + high) // 2
            measured[middle] = reached(middle)
            if measured[middle] >= target_sqnr:
                high = middle
            else:
                low = middle
        count = high
    else:
        count = 0
    bits = {name: 8 if name in ranked[:count] else 4 for name in layers}
    rows = [
        {"layer": name, "output_sqnr_db_alone_at_int4": f"{alone[name]:.1f}", "bits": bits[name]}
        for name in ranked
    ]
    return bits, rows, measured[count]
