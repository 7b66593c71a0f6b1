"""Channel pruning: the exactness oracle, honest `modified`, real shrinking, blocked groups.

The oracle: zero every parameter slice of the channels the pass is about to remove (in every
member of each group), and the zeroed model's output equals the pruned model's within 1e-5
relative (max |diff| / max |ref|).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcomp
from fxcomp import PassManager
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.passes import fuse, prune
from fxcomp.pruning.graph import ChannelGraph
from fxcomp.pruning.plan import PruneOptions, pruning_plan, zero_channels
from tests.conftest import oracle, relative_error


class Branches(nn.Module):
    """Two conv branches concatenated, then a conv; a residual chain; flatten into Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.mix = nn.Conv2d(12, 12, 3, padding=1)
        self.res = nn.Conv2d(12, 12, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.mix(y)
        y = F.relu(y + self.res(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))


class Squeeze(nn.Module):
    """Depthwise conv and a squeeze-excitation block (broadcast multiply)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        y = self.depthwise(F.relu(self.expand(x)))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * scale).mean((2, 3))


@pytest.fixture
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_cat_residual_and_flatten_into_linear(x):
    torch.manual_seed(0)
    model = randomize_batchnorm(Branches()).eval()
    result = oracle(model, x)
    gm = result.module
    assert (gm.get_submodule("a").out_channels, gm.get_submodule("b").out_channels) == (4, 2)
    assert gm.get_submodule("bn").num_features == 6
    assert gm.get_submodule("mix").in_channels == 6 and gm.get_submodule("res").out_channels == 6
    assert gm.get_submodule("fc").in_features == 6 * 16 and gm.get_submodule("fc").out_features == 5
    assert (
        result.report.find("prune").parameters_after < result.report.find("prune").parameters_before
    )


def test_depthwise_and_squeeze_excitation(x):
    torch.manual_seed(0)
    result = oracle(Squeeze().eval(), x)
    depthwise = result.module.get_submodule("depthwise")
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 8
    assert result.module.get_submodule("fc1").out_channels == 2
    assert result.module.get_submodule("project").out_channels == 6  # the model's output


def test_after_fuse_too(x):
    torch.manual_seed(0)
    oracle(randomize_batchnorm(Branches()).eval(), x, passes=[fuse()])


def test_unknown_ops_block_their_groups_by_name(x):
    class Unknown(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.mid = nn.Conv2d(8, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.roll(self.conv(x), 1, dims=1)  # moves channels: not element-wise
            y = self.norm(self.mid(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.head(y)

    gm = fxcomp.trace(Unknown().eval(), x)
    groups = ChannelGraph.build(gm).groups()
    reasons = " | ".join(r for g in groups for r in g.blocked_by)
    assert "'roll': call_function torch.roll is not known to prune" in reasons
    assert "'norm': LayerNorm normalises over the channels" in reasons
    assert "test_prune.py:" in reasons and "`y = torch.roll(self.conv(x)" in reasons
    result = fxcomp.compile(Unknown().eval(), x, passes=[prune(0.5)])
    assert not result.report.find("prune").modified
    table = result.report.table("prune")
    assert "kept: 'roll': call_function torch.roll is not known to prune" in table


@torch.fx.wrap
def softsign_gate(x: torch.Tensor) -> torch.Tensor:
    """An element-wise op fxcomp's channel rules do not know (a wrapped function)."""
    return x / (1 + x.abs())


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(softsign_gate(self.mid(softsign_gate(self.bn(self.conv(x))))))


def test_a_channel_rule_teaches_pruning_an_op_it_does_not_know(x):
    from fxcomp.pruning.rules import channelwise

    torch.manual_seed(0)
    model = randomize_batchnorm(Gated()).eval()
    blocked = fxcomp.compile(model, x, passes=[prune(0.5)])
    assert not blocked.report.find("prune").modified
    assert "softsign_gate is not known to prune" in blocked.report.table("prune")
    calls = []

    def elementwise(graph, node):
        calls.append(node.name)
        return channelwise(graph, node)  # channel k in is channel k out

    rules = {softsign_gate: elementwise}
    result = oracle(model, x, channel_rules=rules)  # exact against the zeroed model
    assert calls and result.report.find("prune").modified
    assert result.module.get_submodule("conv").out_channels == 4
    assert result.module.get_submodule("mid").out_channels == 4
    recorded = next(r for r in result.report.to_dict()["passes"] if r["name"] == "prune")
    assert recorded["options"]["channel_rules"] == {"softsign_gate": "elementwise"}


def test_a_rule_that_refuses_blocks_with_its_reason_and_bad_rules_are_refused(x):
    model = Gated().eval()
    rules = {softsign_gate: lambda graph, node: "its channels are read as a whole"}
    result = fxcomp.compile(model, x, passes=[prune(0.5, channel_rules=rules)])
    assert not result.report.find("prune").modified
    assert "'softsign_gate': its channels are read as a whole" in result.report.table("prune")
    with pytest.raises(fxcomp.InputError, match="a rule is rule\\(graph, node\\)"):
        prune(0.5, channel_rules={softsign_gate: "elementwise"})


def test_importance_may_be_a_function_of_each_weight(x):
    torch.manual_seed(0)
    model = randomize_batchnorm(Branches()).eval()
    base = fxcomp.compile(model, x).module
    cubed = pruning_plan(base, PruneOptions(0.5, importance=lambda w: w.abs() ** 3))
    l1 = pruning_plan(base, PruneOptions(0.5, importance=lambda w: w.abs()))
    named = pruning_plan(base, PruneOptions(0.5, importance="l1"))
    as_sets = [{k: v.tolist() for k, v in p.removed().items()} for p in (cubed, l1, named)]
    assert as_sets[1] == as_sets[2]  # |w| as a function is the "l1" importance
    assert as_sets[0] != as_sets[1]  # and another function ranks otherwise
    oracle(model, x, importance=lambda w: w.abs() ** 3)
    with pytest.raises(fxcomp.InputError, match="gave \\(3,\\) for a weight of shape"):
        pruning_plan(base, PruneOptions(0.5, importance=lambda w: torch.ones(3)))


def test_ratio_zero_is_the_identity_and_second_run_is_honest(x, ctx):
    torch.manual_seed(0)
    model = randomize_batchnorm(Branches()).eval()
    same = fxcomp.compile(model, x, passes=[prune(0.0)])
    assert not same.report.find("prune").modified
    torch.testing.assert_close(same.module(x), model(x), rtol=0, atol=0)
    pruned = fxcomp.compile(model, x, passes=[prune(0.5)]).module
    _, records = PassManager([prune(0.0)]).run(pruned, fxcomp.CompileContext.from_inputs((x,)))
    assert not records[0].modified


def test_round_to_keeps_multiples(x):
    torch.manual_seed(0)
    gm = fxcomp.compile(Squeeze().eval(), x, passes=[prune(0.3, round_to=4)]).module
    assert gm.get_submodule("expand").out_channels % 4 == 0


def test_bad_ratio_and_importance(x):
    with pytest.raises(fxcomp.InputError, match=r"ratio must be in \[0, 1\)"):
        fxcomp.compile(Squeeze().eval(), x, passes=[prune(1.0)])
    with pytest.raises(fxcomp.InputError, match="unknown importance 'fisher'"):
        fxcomp.compile(Squeeze().eval(), x, passes=[prune(0.5, importance="fisher")])
    with pytest.raises(fxcomp.InputError, match="taylor importance needs data"):
        fxcomp.compile(Squeeze().eval(), x, passes=[prune(0.5, importance="taylor")])
    with pytest.raises(fxcomp.InputError, match="unknown scope 'layer'"):
        fxcomp.compile(Squeeze().eval(), x, passes=[prune(0.5, scope="layer")])
    with pytest.raises(fxcomp.InputError, match="steps must be a positive integer"):
        fxcomp.compile(Squeeze().eval(), x, passes=[prune(0.5, steps=0)])


@pytest.mark.parametrize("importance", ["l1", "l2", "random"])
def test_importance_choices_keep_the_oracle(x, importance):
    torch.manual_seed(0)
    model = Squeeze().eval()
    base = fxcomp.trace(model, x)
    plan = pruning_plan(base, PruneOptions(0.5, importance=importance))
    zeroed = copy.deepcopy(base)
    zero_channels(zeroed, plan)
    gm = fxcomp.compile(model, x, passes=[prune(0.5, importance=importance)]).module
    assert relative_error(gm(x), zeroed(x)) < 1e-5


def test_pruned_model_saves_reloads_and_trains(tmp_path, x):
    torch.manual_seed(0)
    gm = fxcomp.compile(Squeeze().eval(), x, passes=[prune(0.5)]).module
    fxcomp.save(gm, tmp_path / "pruned.fxgraph")
    loaded = fxcomp.load(tmp_path / "pruned.fxgraph")
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    loaded.train()
    loss = loaded(x).pow(2).mean()
    loss.backward()
    assert loaded.get_submodule("expand").weight.grad.shape == (8, 3, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_torchvision_models_keep_the_oracle(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    result = oracle(model, torch.randn(1, 3, 224, 224))
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.module.parameters())
    assert after < 0.45 * before


@pytest.mark.slow
def test_digits_pruned_by_half_recovers_within_a_point_in_two_epochs():
    data = load_digits_split()
    model = train(DigitsNet(width=32), data, progress=False)
    unpruned = accuracy(model, data.test_x, data.test_y)
    gm = fxcomp.compile(model, data.test_x[:2], passes=[prune(0.5)]).module
    assert sum(p.numel() for p in gm.parameters()) < 0.3 * sum(
        p.numel() for p in model.parameters()
    )
    tuned = train(gm, data, epochs=2, progress=False)
    assert accuracy(tuned, data.test_x, data.test_y) >= unpruned - 1.0
