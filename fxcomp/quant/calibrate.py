"""Calibration: run representative batches through the observed graph; the graph is unchanged,
the observers' statistics are what changes.

``data`` is any iterable of batches: a tensor, a tuple of inputs, or a ``(inputs..., label)``
tuple as a ``DataLoader`` yields (extra trailing items are ignored). Each batch must match
the example inputs in dtype and in every dimension but the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from tqdm import tqdm

from fxcomp.ir.errors import InputError
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.quant.observers import Observer
from fxcomp.runtime.training import split_batch

__all__ = ["CalibrateOptions", "run_calibration"]


@dataclass(frozen=True)
class CalibrateOptions:
    """The batches to calibrate on (None: the compile's ``calibration_data``) and whether a
    progress bar shows."""

    data: Iterable[Any] | None = None
    progress: bool = True


def _check(inputs: tuple[Any, ...], examples: tuple[Any, ...], index: int) -> None:
    for position, (got, want) in enumerate(zip(inputs, examples, strict=False)):
        if not isinstance(want, torch.Tensor):
            continue
        if (
            not isinstance(got, torch.Tensor)
            or got.dtype != want.dtype
            or got.shape[1:] != want.shape[1:]
        ):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise InputError(
                f"calibration batch {index}, input {position}: got {shape} "
                f"{getattr(got, 'dtype', '')}, but the example input is {tuple(want.shape)} "
                f"{want.dtype}",
                hint="calibrate with data shaped like the example inputs (any batch size)",
            )


def run_calibration(
    gm: GraphModule, ctx: CompileContext, *, options: CalibrateOptions = CalibrateOptions()
) -> PassResult:
    """Run every batch of ``options.data`` (or of ``ctx.config.calibration_data``) through
    ``gm``."""
    data, progress = options.data, options.progress
    if not any(isinstance(m, Observer) for m in gm.modules()):
        raise InputError("the graph has no observers", hint="run insert_observers before calibrate")
    data = data if data is not None else ctx.config.calibration_data
    if data is None:
        raise InputError(
            "no calibration data",
            hint="pass it to quantize(data) / calibrate(data), or compile(calibration_data=...)",
        )
    count = sum(1 for n in gm.graph.find_nodes(op="placeholder") if not n.args)
    seen = 0
    with torch.no_grad():
        for index, batch in enumerate(
            tqdm(data, desc="calibrate", unit="batch", disable=not progress or None)
        ):
            inputs, _ = split_batch(batch, count, index)
            _check(inputs, ctx.config.example_inputs, index)
            gm(*inputs)
            seen += 1
    if not seen:
        raise InputError("the calibration data is empty", hint="pass at least one batch")
    return PassResult(gm, modified=True)
