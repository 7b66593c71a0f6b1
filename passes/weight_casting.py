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

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.fused import ConvReLU, FusedModule, LinearReLU, apply_weight, weighted_layer
from fxcomp.graph import module_of, replace_module
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.verify import sqnr

__all__ = ["HalfWeightLayer", "cast_layer_weights", "cast_weights"]

DTYPES = (torch.float16, torch.bfloat16)


class HalfWeightLayer(FusedModule):
    """A Conv/Linear (fused with ReLU or not) whose weight is stored in 16 bits.

    Example::

        HalfWeightLayer(nn.Linear(4, 2), torch.float16)(torch.randn(3, 4))
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        inner = weighted_layer(layer)
        if inner is None:
            raise TypeError(f"cannot cast the weight of {type(layer).__name__}")
        weight = inner.weight.detach().to(dtype)
        self.relu = isinstance(layer, (ConvReLU, LinearReLU))
        del inner.weight
        self.layer = inner
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_weight(self.layer, x, self.weight.to(x.dtype), self.layer.bias)
        return torch.relu(y) if self.relu else y


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
        ctx.report.tables["cast_weights"] = rows
    return PassResult(gm, modified=bool(rows))


def cast_weights(dtype: torch.dtype = torch.float16) -> Pass:
    """Store Conv/Linear weights as float16 or bfloat16, computing in float32 (module
    docstring).

    Example::

        passes=[fuse(), cast_weights(torch.bfloat16)]
    """
    if dtype not in DTYPES:
        raise InputError(f"cast_weights takes float16 or bfloat16, got {dtype}")

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return cast_layer_weights(gm, ctx, dtype=dtype)

    return Pass("cast_weights", run, run_after=("fuse", "prune", "distill"))
