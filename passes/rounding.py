"""Learned weight rounding: ``round(W / s) -> floor(W / s) + learned {0, 1}`` (AdaRound).

Between ``calibrate`` and ``freeze``, each quantized weight's rounding (up or down on the
same grid) is learned on ``data`` so that the quantized graph's output comes closest to the
float graph's, activations fake-quantized on their calibrated grids
(``fxcomp.quant.rounding``). The grids do not move and the graph's structure does not
change: the kernels and the latency are those of nearest rounding. It runs inside
``quantize(..., rounding="learned")``; ``report.tables["learn_rounding"]`` gives the output
error (MSE over the output's variance) and the rounding term (0 once every weight sits on
one of its two points), per pass over the data.

Example::

    passes=[fuse(), quantize(batches, engine="xnnpack", rounding="learned")]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.quant.rounding import RoundingOptions, learn_weight_rounding

__all__ = ["LearnRoundingOptions", "learn_rounding"]


@dataclass(frozen=True)
class LearnRoundingOptions:
    """``learn_rounding``'s data (None: the compile's calibration data) and training."""

    data: Iterable[Any] | None
    training: RoundingOptions


def learn_rounding(
    data: Iterable[Any] | None = None,
    *,
    steps: int = 200,
    lr: float = 0.1,
    regularization: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> Pass:
    """Learn each quantized weight's rounding on ``data`` (module docstring): ``steps``
    Adam steps at ``lr`` (whole passes over ``data``, rounded up), ``regularization`` the
    weight of the term that drives each weight to one of its two grid points.

    Example::

        passes=[fuse(), observe(config), calibrate(data), learn_rounding(data), freeze()]
    """
    training = RoundingOptions(steps, lr, regularization, seed, progress)
    training.check()
    options = LearnRoundingOptions(data, training)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        batches = options.data if options.data is not None else ctx.config.calibration_data
        if batches is None:
            raise InputError(
                "learn_rounding needs data to learn the rounding on",
                hint="pass it to quantize(data) / learn_rounding(data), or "
                "compile(calibration_data=...)",
            )
        return learn_weight_rounding(gm, ctx, data=batches, options=training)

    return Pass(
        "learn_rounding",
        run,
        run_after=("calibrate",),
        run_before=("freeze",),
        options=options,
    )
