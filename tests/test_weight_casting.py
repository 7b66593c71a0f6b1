"""Weight-only float16/bfloat16 casting: half the weight bytes, float32 compute, outputs
within the 16-bit rounding of float (SQNR bounds stated per dtype)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxcomp
from fxcomp.ir.graph import state_size
from fxcomp.nn.stored_weights import HalfWeightLayer
from fxcomp.passes import cast_weights, fuse
from fxcomp.runtime.parity import sqnr


@pytest.mark.parametrize(("dtype", "min_db"), [(torch.float16, 55.0), (torch.bfloat16, 35.0)])
def test_half_weights_halve_storage_and_keep_outputs(dtype, min_db):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxcomp.compile(model, x, passes=[fuse(), cast_weights(dtype)])
    gm = result.module
    layers = [m for m in gm.modules() if isinstance(m, HalfWeightLayer)]
    assert len(layers) == 21 and all(m.weight.dtype == dtype for m in layers)
    assert all(not hasattr(m.layer, "weight") for m in layers)
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) > min_db
    weights = sum(row["weights"] for row in result.report.tables["cast_weights"])
    fused = fxcomp.compile(model, x, passes=[fuse()]).module
    assert state_size(fused)[1] - state_size(gm)[1] == 2 * weights
    assert result.report.find("cast_weights").modified


def test_cast_weights_refuses_other_dtypes():
    with pytest.raises(fxcomp.InputError, match="float16 or bfloat16"):
        cast_weights(torch.int8)
