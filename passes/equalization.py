"""Cross-layer equalization: ``C(f(P(x))) -> C'(f(P'(x)))`` with equal per-channel ranges.

For each pair of layers whose shared channels can be rescaled (``fxcomp.nn.scaling``: a Conv
or Linear feeding one Conv or Linear through ReLU, pooling or a 1x1 flatten), channel
``c`` is scaled by ``s_c = sqrt(r1_c / r2_c)``, where ``r1_c`` is the largest magnitude in
the producer's output channel ``c`` and ``r2_c`` in the consumer's input channel ``c``:
both become ``sqrt(r1_c * r2_c)`` (Nagel et al., data-free quantization). The function is
unchanged; one per-tensor weight grid, and the activation grid between the two layers,
no longer have to stretch over a few large channels. Run it after ``fuse`` (BatchNorm
folded) and before ``quantize``. ``report.tables["equalize"]`` gives each pair's range
spread (largest over smallest channel range) before and after.

Example::

    passes=[fuse(), equalize(), quantize(batches)]
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxcomp.nn.fused import weighted_layer
from fxcomp.nn.scaling import ScalePair, rescale_, scale_pairs
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult

__all__ = ["equalize", "equalize_layers", "pair_ranges"]

_FLOOR = 1e-8


def pair_ranges(gm: GraphModule, pair: ScalePair) -> tuple[torch.Tensor, torch.Tensor]:
    """Per shared channel: the producer's output range and the consumer's input range."""
    producer = weighted_layer(gm.get_submodule(pair.producer)).weight.detach()
    (name,) = pair.consumers
    consumer = weighted_layer(gm.get_submodule(name)).weight.detach()
    r1 = producer.abs().reshape(pair.channels, -1).amax(1)
    r2 = consumer.abs().transpose(0, 1).reshape(pair.channels, -1).amax(1)
    return r1, r2


def _spread(ranges: torch.Tensor) -> float:
    return float(ranges.max() / ranges.clamp(min=_FLOOR).min())


def equalize_layers(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Equalize every rescalable pair of ``gm`` (module docstring)."""
    rows = []
    for pair in scale_pairs(gm):
        r1, r2 = pair_ranges(gm, pair)
        live = (r1 > _FLOOR) & (r2 > _FLOOR)
        scale = torch.where(live, torch.sqrt(r1 / r2.clamp(min=_FLOOR)), torch.ones_like(r1))
        if torch.allclose(scale, torch.ones_like(scale), rtol=1e-3):
            continue
        before = (_spread(r1), _spread(r2))
        rescale_(gm, pair, scale)
        r1, r2 = pair_ranges(gm, pair)
        rows.append(
            {
                "producer": pair.producer,
                "consumer": ", ".join(pair.consumers),
                "channels": pair.channels,
                "producer_spread": f"{before[0]:.3g} -> {_spread(r1):.3g}",
                "consumer_spread": f"{before[1]:.3g} -> {_spread(r2):.3g}",
            }
        )
    if rows:
        ctx.state.report.tables["equalize"] = rows
    return PassResult(gm, modified=bool(rows))


def equalize() -> Pass:
    """Cross-layer equalization of every rescalable layer pair (module docstring).

    Example::

        passes=[fuse(), equalize(), quantize(batches, per_channel=False)]
    """

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return equalize_layers(gm, ctx)

    return Pass("equalize", run, run_after=("fuse", "prune"), run_before=("quantize", "qat"))
