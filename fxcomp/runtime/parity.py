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

from fxcomp.ir.errors import VerificationError

__all__ = [
    "FLOAT_SQNR_DB",
    "MARGIN_DB",
    "check_against_float",
    "check_against_reference",
    "checked_parity",
    "max_abs_error",
    "parity",
    "reference_margin_db",
    "sqnr",
    "top1_agreement",
]

MARGIN_DB = 3.0
FLOAT_SQNR_DB = 80.0


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


def reference_margin_db(values: int) -> float:
    """How far an artifact's SQNR against the reference graph may fall below the reference's
    against float when both are measured on ``values`` output values: ``MARGIN_DB`` (the
    artifact adds at most as much noise again), plus four standard deviations of a noise
    power estimated from that many values (relative spread ``sqrt(2 / values)``): a
    classifier's ten logits measure a noise power only to within about 45%.

    Example::

        reference_margin_db(1000)   # 3.7 dB; 7.5 dB for 10 values
    """
    return MARGIN_DB + 10 * math.log10(1 + 4 * math.sqrt(2 / max(values, 1)))


def check_against_reference(
    figures: dict[str, float], quantization_sqnr: float, what: str, *, values: int
) -> None:
    """A backend's kernels round differently from the reference graph, and deep networks
    compound that; what the backend adds must stay within twice the noise quantization
    itself added: an SQNR against the reference at most ``reference_margin_db(values)``
    below the reference's against float, both measured on ``values`` output values. A rule
    that does not match its reference pattern errs by far more.

    Example::

        check_against_reference({"sqnr_db_vs_reference": 30.0}, 25.0, "TorchScript", values=1000)
    """
    margin = reference_margin_db(values)
    against_reference = figures.get("sqnr_db_vs_reference")
    if against_reference is not None and against_reference < quantization_sqnr - margin:
        raise VerificationError(
            f"the {what} output is {against_reference:.1f} dB from the reference graph; "
            f"quantization itself is {quantization_sqnr:.1f} dB from float, and the backend "
            f"may add at most as much noise again ({margin:.1f} dB, measured on {values} "
            "output values)",
            hint="report this model: a backend rule does not match its reference pattern",
        )


def check_against_float(figures: dict[str, float], what: str, min_db: float) -> None:
    """A float artifact must reproduce the graph it was made from: SQNR against it at
    least ``min_db`` (``FLOAT_SQNR_DB``; less where weights were stored in float16)."""
    against_graph = figures.get("sqnr_db_vs_reference")
    if against_graph is not None and against_graph < min_db:
        raise VerificationError(
            f"the float {what} output is {against_graph:.1f} dB from the compiled graph's "
            f"(at least {min_db:g} dB expected)",
            hint="report this model: an op exports with different semantics",
        )


def checked_parity(
    outputs: Any,
    *,
    expected: Any,
    float_outputs: Any,
    quantized: bool,
    what: str,
    min_db: float = FLOAT_SQNR_DB,
) -> dict[str, float]:
    """A backend artifact's parity figures, checked. ``expected`` is what the exported graph
    itself gives (for a quantized graph, the reference graph's outputs): a quantized
    artifact may differ from it by at most the noise quantization added
    (``check_against_reference``), a float one must reproduce it (``check_against_float``).
    Figures against ``float_outputs`` (the traced model, before any pass) are reported.

    Example::

        figures = checked_parity(out, expected=ref, float_outputs=f, quantized=True, what="ORT")
    """
    figures = parity(outputs, float_outputs=float_outputs, reference_outputs=expected)
    if quantized and float_outputs is not None:
        quantization_sqnr = sqnr(float_outputs, expected)
        figures["sqnr_db_reference_vs_float"] = quantization_sqnr
        values = _first(outputs).numel()
        check_against_reference(figures, quantization_sqnr, what, values=values)
    elif not quantized:
        check_against_float(figures, what, min_db)
    return figures
