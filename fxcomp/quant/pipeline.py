"""The one quantization pipeline: observe, calibrate, freeze (then lower, for engines with
kernels), as passes that ``quantize``, ``qat``, the per-layer analysis and mixed precision
all run through the pass manager, with its checks.

Example::

    passes=[fuse(), observe(QuantConfig("x86")), calibrate(loader), freeze(), lower()]
    reference = quantize_copy(fused, QuantConfig("tensorrt"), batches, (x,))
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch.fx import GraphModule

from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassManager, PassResult
from fxcomp.quant.calibrate import CalibrateOptions, run_calibration
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.freeze import freeze_qparams
from fxcomp.quant.lowering import lower_to_kernels
from fxcomp.quant.observe import ObserveOptions, insert_observers

__all__ = ["calibrate", "freeze", "lower", "observe", "quantize_copy"]


def observe(
    config: QuantConfig = QuantConfig(), *, only_nodes: Iterable[str] | None = None
) -> Pass:
    """Insert observers on every quantizable edge for ``config`` and store the config on the
    graph (the first step of ``quantize``); ``only_nodes`` limits the ops with their own grid
    to those named (the per-layer analysis quantizes one layer at a time).

    Example::

        fxcomp.compile(model, x, passes=[fuse(), observe(QuantConfig("tensorrt"))])
    """
    options = ObserveOptions(config, frozenset(only_nodes) if only_nodes is not None else None)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return insert_observers(gm, ctx, options=options)

    return Pass("insert_observers", run, run_after=("fuse",), options=options)


def calibrate(data: Iterable[Any] | None = None, *, progress: bool = True) -> Pass:
    """Run calibration batches through the observed graph, with a progress bar; without
    ``data``, the ``calibration_data`` given to ``fxcomp.compile``.

    Example::

        passes=[fuse(), observe(), calibrate(loader), freeze()]
    """
    options = CalibrateOptions(data, progress)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return run_calibration(gm, ctx, options=options)

    return Pass("calibrate", run, run_after=("insert_observers",), options=options)


def freeze() -> Pass:
    """Fix the observed ranges as Q/DQ steps and quantize weights: the reference graph.

    Example::

        passes=[fuse(), observe(), calibrate(data), freeze()]
    """
    return Pass("freeze", freeze_qparams, run_after=("calibrate",))


def lower() -> Pass:
    """Lower the reference graph to fbgemm/qnnpack quantized kernels for its engine.

    Example::

        passes=[fuse(), observe(), calibrate(data), freeze(), lower()]
    """
    return Pass("lower", lower_to_kernels, run_after=("freeze",))


def quantize_copy(
    floating: GraphModule,
    config: QuantConfig,
    data: Iterable[Any],
    example_inputs: tuple[Any, ...],
    *,
    only_nodes: Iterable[str] | None = None,
) -> GraphModule:
    """A copy of ``floating`` quantized for ``config``: observed, calibrated on ``data`` and
    frozen through the pass manager, which runs it on ``example_inputs`` (``only_nodes`` as
    ``observe``'s). The reference graph.

    Example::

        reference = quantize_copy(fused, QuantConfig(skip=("fc",)), batches, (x,))
    """
    steps = [observe(config, only_nodes=only_nodes), calibrate(data, progress=False), freeze()]
    scratch = CompileContext.from_inputs(example_inputs)
    result, _ = PassManager(steps).run(copy.deepcopy(floating), scratch)
    return result.graph_module
