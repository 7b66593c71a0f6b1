"""Parity figures between an artifact's outputs and its references.

Example::

    sqnr(float_out, int8_out)            # dB; higher is closer
    parity(out, float_outputs=f, reference_outputs=r)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["max_abs_error", "parity", "sqnr", "top1_agreement"]


def _first(outputs: Any) -> torch.Tensor:
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return leaves[0].detach().float()


def sqnr(reference: Any, actual: Any) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB.

    Example::

        sqnr(torch.ones(4), torch.ones(4) * 1.01)   # 40.0
    """
    ref, out = _first(reference), _first(actual)
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def max_abs_error(reference: Any, actual: Any) -> float:
    """The largest absolute difference."""
    return (_first(reference) - _first(actual)).abs().max().item()


def top1_agreement(reference: Any, actual: Any) -> float:
    """Share of rows whose arg-max class agrees (outputs of shape (batch, classes))."""
    ref, out = _first(reference), _first(actual)
    if ref.dim() != 2:
        return math.nan
    return (ref.argmax(1) == out.argmax(1)).float().mean().item()


def parity(outputs: Any, *, float_outputs: Any = None, reference_outputs: Any = None) -> dict:
    """SQNR and top-1 agreement against the float model; max abs error against the reference."""
    figures: dict[str, float] = {}
    if float_outputs is not None:
        figures["sqnr_db_vs_float"] = sqnr(float_outputs, outputs)
        figures["top1_agreement_vs_float"] = top1_agreement(float_outputs, outputs)
    if reference_outputs is not None:
        figures["max_abs_error_vs_reference"] = max_abs_error(reference_outputs, outputs)
        figures["sqnr_db_vs_reference"] = sqnr(reference_outputs, outputs)
    return figures
