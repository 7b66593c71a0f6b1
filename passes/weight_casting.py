"""Weight-only casting: ``Conv(x; W) -> HalfWeightLayer(Conv)(x; float(W16))``.

Every Conv/Linear weight (the one inside a fused unit too) is stored as ``float16`` or
``bfloat16`` and cast back to the activations' dtype when the layer runs: half the weight
storage, compute unchanged (float32 kernels everywhere, which CPUs run fastest). Biases,
BatchNorm and everything else stay float32. ``report.tables["cast_weights"]`` gives each
layer's weight SQNR and bytes.

Example::

    result = fxcomp.compile(model, x, passes=[fuse(), cast_weights(torch.float16)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import module_of, replace_module
from fxcomp.nn.fused import weighted_layer
from fxcomp.nn.stored_weights import HalfWeightLayer
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.runtime.parity import sqnr

__all__ = ["CastOptions", "cast_weights"]

DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CastOptions:
    """The 16-bit dtype weights are stored in."""

    dtype: torch.dtype = torch.float16


def cast_layer_weights(gm: GraphModule, ctx: CompileContext, *, dtype: torch.dtype) -> PassResult:
    """Store every Conv/Linear weight of ``gm`` as ``dtype`` (module docstring)."""
    if dtype not in DTYPES:
        raise InputError(f"cast_weights takes float16 or bfloat16, got {dtype}")
    rows = []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        inner = weighted_layer(module)
        if inner is None or not inner.weight.dtype.is_floating_point:
            continue
        original = inner.weight.detach().clone()
        cast = HalfWeightLayer(module, dtype)
        replace_module(gm, str(node.target), cast)
        rows.append(
            {
                "layer": str(node.target),
                "weights": original.numel(),
                "bytes": 2 * original.numel(),
                "float32_bytes": 4 * original.numel(),
                "weight_sqnr_db": f"{sqnr(original, cast.weight.float()):.1f}",
            }
        )
    if rows:
        ctx.state.report.tables["cast_weights"] = rows
    return PassResult(gm, modified=bool(rows))


def cast_weights(dtype: torch.dtype = torch.float16) -> Pass:
    """Store Conv/Linear weights as float16 or bfloat16, computing in float32 (module
    docstring).

    Example::

        passes=[fuse(), cast_weights(torch.bfloat16)]
    """
    if dtype not in DTYPES:
        raise InputError(f"cast_weights takes float16 or bfloat16, got {dtype}")

    options = CastOptions(dtype)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return cast_layer_weights(gm, ctx, dtype=options.dtype)

    return Pass("cast_weights", run, run_after=("fuse", "prune", "distill"), options=options)
