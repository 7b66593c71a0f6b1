"""Every torchvision classification model traces and fuses, and keeps its output.

Tolerance: max |fused - original| / max |original| < 1e-4 on a random input, eval mode,
random weights with randomized BatchNorm statistics (so that folding changes weights).
Only models over 500M parameters are skipped: regnet_y_128gf and vit_h_14.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxcomp
from fxcomp.cli.zoo import non_degenerate
from tests.conftest import relative_error

MODELS = torchvision.models.list_models(module=torchvision.models)
TOO_LARGE = {"regnet_y_128gf", "vit_h_14"}
TOLERANCE = 1e-4


def test_the_skipped_models_are_exactly_those_over_500m_parameters():
    # torchvision's weight metadata states each architecture's size; nothing is downloaded
    sizes = {m: torchvision.models.get_model_weights(m).DEFAULT.meta["num_params"] for m in MODELS}
    assert len(MODELS) == 80
    assert {m for m, n in sizes.items() if n > 500e6} == TOO_LARGE


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MODELS if m not in TOO_LARGE])
def test_trace_and_fuse_keeps_the_output(name):
    torch.manual_seed(0)
    model = non_degenerate(torchvision.models.get_model(name, weights=None)).eval()
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        result = fxcomp.compile(model, x, passes=[fxcomp.passes.fuse()])
        actual = result.module(x)
    assert expected.abs().max() > 0
    assert relative_error(actual, expected) < TOLERANCE
    # every BatchNorm left in the graph is there for a reason the report gives
    left = {
        n.name
        for n in result.module.graph.nodes
        if isinstance(fxcomp.ir.graph.module_of(result.module, n), nn.modules.batchnorm._BatchNorm)
    }
    explained = {note.node for note in result.report.notes if note.rule == "fold_batchnorm"}
    assert left == explained
