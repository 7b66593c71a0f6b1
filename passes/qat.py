"""Quantization-aware training: ``qat = group_batchnorm, insert_observers, train_qat, freeze,
lower``, ending in the same reference graph (and kernels) that ``quantize`` produces.

The graph trains with fake quantization (``fxcomp.quant.qat``): hard-label loss, or
distillation from a float ``teacher``; Conv and BatchNorm that ``fuse`` did not fold train
as one unit and are folded at the end; ``freeze`` then fixes the trained ranges as Q/DQ
steps exactly as after calibration. Runs unchanged under torchrun.

Example::

    passes=[fuse(), prune(0.5), qat(train_batches, epochs=2, teacher=model)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.passes.fusion import FuseOptions, fuse_conv_bn_relu
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult, Pipeline
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.ops import SkipSpec
from fxcomp.quant.pipeline import freeze, observe
from fxcomp.quant.pipeline import lower as lower_step
from fxcomp.quant.qat import QAT_OBSERVERS, QATOptions, train_quantization_aware
from fxcomp.runtime.distillation import DistillOptions
from fxcomp.runtime.training import LoopOptions, TrainOptions

__all__ = ["QATPassOptions", "qat"]


@dataclass(frozen=True)
class QATPassOptions:
    """``qat``'s options: the graph's config, the data, how it trains, whether it lowers."""

    config: QuantConfig
    data: Iterable[Any]
    training: QATOptions
    lower: bool


def qat(
    data: Iterable[Any],
    *,
    epochs: int = 2,
    lr: float = 1e-4,
    engine: str = "x86",
    observer: str = "moving_average",
    ranges: str = "observed",
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    skip: Sequence[SkipSpec] = (),
    per_channel: bool = True,
    reduce_range: bool | None = None,
    lower: bool | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    **loop: Unpack[LoopOptions],
) -> Pipeline:
    """INT8 quantization-aware training for ``engine`` on ``data``, in place of ``quantize``.

    ``observer`` (``moving_average`` or ``minmax``) tracks each activation's range while it
    trains; ``ranges="learned"`` trains the scales instead. With a ``teacher`` the loss is
    distillation from it (``temperature``, ``alpha`` as in ``distill``). The other options
    are ``quantize``'s, and the loop's keywords are ``distill``'s (``LoopOptions``).

    Example::

        fxcomp.compile(model, x, passes=[fuse(), qat(batches, epochs=2, freeze_bn_after=1)])
    """
    if observer not in QAT_OBSERVERS:
        raise InputError(
            f"qat observer must be one of {', '.join(QAT_OBSERVERS)}, got {observer!r}",
            hint="histogram and mse ranges are for calibration (quantize), not per batch",
        )
    config = QuantConfig(engine, observer, per_channel, reduce_range, tuple(skip))
    training = TrainOptions.of("qat", epochs, lr, loop)
    distillation = DistillOptions(training, temperature, alpha, loss=loss)
    options = QATOptions(distillation, teacher, ranges, freeze_bn_after, freeze_observers_after)
    options.check()
    lower = config.target.kernels if lower is None else lower
    described = QATPassOptions(config, data, options, lower)

    def group(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return fuse_conv_bn_relu(gm, ctx, options=FuseOptions(train_batchnorm=True))

    def train(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return train_quantization_aware(gm, ctx, data=data, options=options)

    steps = [
        Pass("group_batchnorm", group),
        observe(config),
        Pass("train_qat", train),
        freeze(),
    ]
    if lower:
        steps.append(lower_step())
    return Pipeline("qat", steps, run_after=("fuse", "prune", "distill"), options=described)
