"""The bar a quantized artifact is held to against its reference graph."""

from __future__ import annotations

import pytest
import torch

from fxcomp.ir.errors import VerificationError
from fxcomp.runtime.parity import (
    MARGIN_DB,
    check_against_reference,
    checked_parity,
    reference_margin_db,
)


def test_the_margin_widens_for_outputs_of_few_values():
    assert reference_margin_db(10) == pytest.approx(7.45, abs=0.01)
    assert reference_margin_db(1000) == pytest.approx(3.71, abs=0.01)
    assert MARGIN_DB < reference_margin_db(10**7) < MARGIN_DB + 0.01


def test_ten_logits_4_db_below_pass_and_a_thousand_fail():
    """What a trained resnet18's ten logits gave in ExecuTorch (41.3 dB from the reference
    graph, which is 45.0 dB from float) is within the spread of ten values, not of 1000."""
    check_against_reference({"sqnr_db_vs_reference": 41.3}, 45.0, "ExecuTorch", values=10)
    figures = {"sqnr_db_vs_reference": 40.9}
    with pytest.raises(VerificationError, match=r"40\.9 dB .* 45\.0 dB .*3\.7 dB.* 1000 output"):
        check_against_reference(figures, 45.0, "ExecuTorch", values=1000)
    with pytest.raises(VerificationError, match="a backend rule does not match"):
        check_against_reference({"sqnr_db_vs_reference": 36.0}, 45.0, "ExecuTorch", values=10)


def test_checked_parity_measures_the_margin_on_the_outputs_values():
    gen = torch.Generator().manual_seed(0)
    float_out = torch.randn(1, 10, generator=gen)
    reference = float_out + 0.01 * torch.randn(1, 10, generator=gen)  # quantization noise
    artifact = reference + 0.02 * torch.randn(1, 10, generator=gen)  # about 6 dB more
    figures = checked_parity(
        artifact, expected=reference, float_outputs=float_out, quantized=True, what="test"
    )
    gap = figures["sqnr_db_reference_vs_float"] - figures["sqnr_db_vs_reference"]
    assert MARGIN_DB < gap < reference_margin_db(10)
    wide = float_out.repeat(1, 100), reference.repeat(1, 100), artifact.repeat(1, 100)
    with pytest.raises(VerificationError, match="1000 output values"):
        checked_parity(wide[2], expected=wide[1], float_outputs=wide[0], quantized=True, what="t")
