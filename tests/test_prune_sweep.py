"""Every torchvision classification model prunes at ratio 0.5, runs, and keeps the oracle.

Oracle: the pruned model's output equals that of the model with every parameter slice of
the removed channels zeroed, within 1e-5 relative, on random weights with randomized
BatchNorm statistics. Groups that cannot be pruned exactly are named with the op that
blocks them; ``BLOCKED`` lists the models that have any (besides the input and output).
Only models over 500M parameters are skipped (see ``test_torchvision_sweep``).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxcomp
from fxcomp.cli.zoo import non_degenerate
from fxcomp.pruning.plan import PruneOptions, pruning_plan
from tests.conftest import oracle
from tests.test_torchvision_sweep import MODELS, TOO_LARGE

# Transformers: a LayerNorm over the embedding (removing a channel changes every other),
# attention (MultiheadAttention, swin's shifted_window_attention, maxvit's attention),
# position embeddings and class tokens keep the embedding width; their MLP hidden layers,
# and maxvit's MBConv blocks, prune. After ``unpack_attention`` ViT's attention prunes too
# (``test_vit_attention_prunes_after_unpacking``).
BLOCKED = {
    *(f"convnext_{size}" for size in ("tiny", "small", "base", "large")),
    "maxvit_t",
    *(f"swin_{v}{size}" for v in ("", "v2_") for size in "tsb"),
    *(f"vit_{size}" for size in ("b_16", "b_32", "l_16", "l_32")),
}


def _blocked(groups) -> list[str]:
    return sorted(
        {
            reason
            for group in groups
            for reason in group.blocked_by
            if ": model input" not in reason and ": model output" not in reason
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MODELS if m not in TOO_LARGE])
def test_every_classification_model_prunes_exactly(name):
    torch.manual_seed(0)
    model = non_degenerate(torchvision.models.get_model(name, weights=None)).eval()
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert model(x).std() > 0
    result = oracle(model, x)
    with torch.no_grad():
        assert result.module(torch.randn(2, 3, size, size)).shape == (2, 1000)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.module.parameters())
    assert after < (0.75 if name in BLOCKED else 0.5) * before
    plan = pruning_plan(fxcomp.trace(model, x), PruneOptions(0.5))
    blocked = _blocked(plan.groups)
    assert bool(blocked) == (name in BLOCKED), blocked
    rows = result.report.tables["prune"]
    assert rows[-1]["status"].startswith("kept: 'output': model output")  # the classifier
    assert sum(row["status"].endswith("sets removed") for row in rows) >= len(plan.plans)


@pytest.mark.slow
def test_vit_attention_prunes_after_unpacking():
    """ViT-B/32 with its MultiheadAttention layers unpacked: the query/key and value widths
    of every head prune (64 -> 32), exactly; only the embedding width stays blocked."""
    from fxcomp.passes import unpack_attention

    torch.manual_seed(0)
    model = non_degenerate(torchvision.models.vit_b_32(weights=None)).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    x = torch.randn(1, 3, 224, 224)
    result = oracle(model, x, passes=(unpack_attention(),))
    gm = result.module
    for i in range(12):
        attention = gm.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention")
        widths = [getattr(attention, f"{n}_proj").out_features for n in "qkv"]
        assert widths == [12 * 32] * 3 and attention.out_proj.in_features == 12 * 32
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in gm.parameters())
    assert after < 0.6 * before  # measured: 88.2M -> 45.7M
    plan = pruning_plan(
        fxcomp.compile(model, x, passes=[unpack_attention()]).module, PruneOptions()
    )
    assert not any("attention" in reason for reason in _blocked(plan.groups))
    with torch.no_grad():
        assert gm(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
