"""The exactness oracle on hand-made graphs, one per coupling kind, and the pass's options.

Oracle (``tests.conftest.oracle``): the pruned model's output equals the output of the
model with every parameter slice of the removed channels zeroed, within 1e-5 relative.
"""

from __future__ import annotations

import json

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcomp
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.passes import prune
from fxcomp.pruning.graph import ChannelGraph
from fxcomp.pruning.plan import PruneOptions, pruning_plan
from tests.conftest import oracle, relative_error


@pytest.fixture
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class SplitHeads(nn.Module):
    """One conv split into two heads of different widths (``split``), and a ``chunk``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 12, 3, padding=1)
        self.head_a = nn.Conv2d(8, 4, 1)
        self.head_b = nn.Conv2d(4, 4, 1)
        self.pair = nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = torch.split(F.relu(self.trunk(x)), [8, 4], dim=1)
        left, right = self.pair(x).chunk(2, dim=1)
        return self.head_a(a) + self.head_b(b) + self.mix(left * right)


class Grouped(nn.Module):
    """A grouped convolution (4 groups) between two plain ones, with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(24)
        self.out = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.grouped(F.relu(self.inner(x))))))


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle through view/transpose/view, sizes baked in as literals,
    a GroupNorm, and a LeNet-style ``view(-1, C * H * W)`` into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)
        self.norm = nn.GroupNorm(6, 12)
        self.after = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = self.norm(self.conv(x))
        y = y.view(-1, 3, 4, 8, 8).transpose(1, 2).contiguous().view(-1, 12, 8, 8)
        y = F.max_pool2d(F.relu(self.after(y)), 2)
        return self.fc(y.view(-1, 6 * 4 * 4))


class Tokens(nn.Module):
    """Patches as tokens (N, L, C): Linear over 3-D values, an MLP with a residual, permute."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).permute(0, 2, 1)
        tokens = tokens + self.down(F.gelu(self.up(tokens)))
        return self.head(tokens.mean(1))


class TokenOps(nn.Module):
    """timm's token-model idioms: LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)`` after a
    Linear, MetaFormer's StarReLU ``s * relu(x) ** 2 + b``, and an element-wise division."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.up = nn.Linear(8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.down = nn.Linear(32, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        hidden = self.up(tokens)
        hidden = self.bn(hidden.flatten(0, 1)).reshape_as(hidden)
        hidden = 0.8 * F.relu(hidden) ** 2 + 0.1
        hidden = hidden / (1 + hidden.pow(2))
        return self.head((tokens + self.down(hidden)).mean(1))


def test_reshape_as_powers_and_division_prune_exactly(x):
    torch.manual_seed(0)
    gm = oracle(randomize_batchnorm(TokenOps()).eval(), x).module
    assert gm.get_submodule("up").out_features == 16
    assert gm.get_submodule("bn").num_features == 16
    assert gm.get_submodule("down").in_features == 16


def test_split_and_chunk_into_heads(x):
    torch.manual_seed(0)
    gm = oracle(SplitHeads().eval(), x).module
    assert gm.get_submodule("trunk").out_channels == 6
    assert (gm.get_submodule("head_a").in_channels, gm.get_submodule("head_b").in_channels) == (
        4,
        2,
    )
    assert gm.get_submodule("pair").out_channels == 4  # 2 of each half: chunk stays even
    assert "split(relu, [4, 2], dim = 1)" in gm.code and "pair.split([2, 2], dim = 1)" in gm.code


def test_grouped_convolution_keeps_its_groups(x):
    torch.manual_seed(0)
    gm = oracle(randomize_batchnorm(Grouped()).eval(), x).module
    grouped = gm.get_submodule("grouped")
    assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (8, 12, 4)
    assert grouped.weight.shape == (12, 2, 3, 3)
    assert gm.get_submodule("bn").num_features == 12


def test_channel_shuffle_group_norm_and_baked_view_sizes(x):
    torch.manual_seed(0)
    model = Shuffle().eval()
    gm = oracle(model, x).module
    assert gm.get_submodule("conv").out_channels == 6
    norm = gm.get_submodule("norm")
    assert (norm.num_channels, norm.num_groups) == (6, 3)  # whole GroupNorm groups went
    assert gm.get_submodule("fc").in_features == 3 * 16
    assert "view(-1, 3, 2, 8, 8)" in gm.code and "view(-1, 48)" in gm.code
    assert gm(torch.randn(5, 3, 8, 8)).shape == (5, 5)


def test_linear_chains_over_tokens(x):
    torch.manual_seed(0)
    gm = oracle(Tokens().eval(), x).module
    assert gm.get_submodule("up").out_features == 16
    assert gm.get_submodule("patch").out_channels == 4  # the residual stream, tied to down
    assert gm.get_submodule("down").out_features == 4
    assert gm.get_submodule("head").in_features == 4


def test_groups_name_members_and_sizes(x):
    gm = fxcomp.trace(Shuffle().eval(), x)
    groups = [g for g in ChannelGraph.build(gm).groups() if g.prunable]
    assert [g.values[:2] for g in groups] == [["conv", "norm"], ["after", "relu"]]
    # GroupNorm ties pairs {0, 1}, {2, 3}...; the shuffle ties channel k of its 3 groups
    # {0, 4, 8}...: two sets, {0, 1, 4, 5, 8, 9} and {2, 3, 6, 7, 10, 11}, in every value
    assert groups[0].sets == 2
    assert sorted(c for v, c in groups[0].channel_sets[0] if v == "conv") == [0, 1, 4, 5, 8, 9]


def test_global_scope_ranks_across_groups(x):
    torch.manual_seed(0)
    model = randomize_batchnorm(Grouped()).eval()
    with torch.no_grad():
        model.inner.weight[:8] *= 0.01  # half of one group is far less important
    base = fxcomp.trace(model, x)
    plan = pruning_plan(base, PruneOptions(0.5, scope="global"))
    total = sum(p.group.sets for p in plan.plans)
    assert sum(len(p.removed) for p in plan.plans) == total // 2
    assert len(plan.plans[0].removed) != len(plan.plans[1].removed)
    oracle(model, x, scope="global")


def test_ignore_and_per_layer_ratios(x):
    torch.manual_seed(0)
    gm = fxcomp.compile(Grouped().eval(), x, passes=[prune(0.5, ignore=["inner"])]).module
    assert gm.get_submodule("inner").out_channels == 16
    assert gm.get_submodule("grouped").out_channels == 12
    gm = fxcomp.compile(Grouped().eval(), x, passes=[prune(0.5, ratios={"gro*": 0.25})]).module
    assert (gm.get_submodule("inner").out_channels, gm.get_submodule("grouped").out_channels) == (
        8,
        20,
    )


def test_bn_scale_removes_the_smallest_gammas(x):
    torch.manual_seed(0)
    model = randomize_batchnorm(Grouped()).eval()
    base = fxcomp.trace(model, x)
    plan = pruning_plan(base, PruneOptions(0.5, importance="bn_scale"))
    gamma = model.bn.weight.detach().abs()
    removed = plan.removed()["bn"]
    kept = torch.tensor([c for c in range(24) if c not in removed.tolist()])
    assert gamma[removed].max() <= gamma[kept].min() * 4  # sets of 4 (one per group): sums
    oracle(model, x, importance="bn_scale")


def test_taylor_importance_uses_the_data(x):
    torch.manual_seed(0)
    data = [(x, torch.tensor([0, 3]))]
    loss = lambda out, y: F.cross_entropy(out.mean((2, 3)), y)  # noqa: E731
    result = oracle(Grouped().eval(), x, importance="taylor", data=data, loss=loss)
    assert result.module.get_submodule("inner").out_channels == 8
    assert all(p.grad is None for p in result.module.parameters())
    other = pruning_plan(
        fxcomp.trace(Grouped().eval(), x),
        PruneOptions(0.5, importance="taylor", data=[(x, torch.tensor([1, 4]))], loss=loss),
    )
    same = pruning_plan(fxcomp.trace(Grouped().eval(), x), PruneOptions(0.5, importance="l2"))
    assert [p.removed for p in other.plans] != [p.removed for p in same.plans]


def test_steps_prune_in_rounds_and_call_back(x):
    torch.manual_seed(0)
    calls = []
    result = fxcomp.compile(
        Tokens().eval(),
        x,
        passes=[prune(0.5, steps=2, between_steps=lambda gm, step: calls.append(step))],
    )
    assert calls == [1]
    assert result.module.get_submodule("up").out_features == 16


def test_report_table_and_importance_figure(x, tmp_path):
    torch.manual_seed(0)
    result = fxcomp.compile(
        randomize_batchnorm(Grouped()).eval(), x, passes=[prune(0.5)], output_dir=tmp_path
    )
    rows = {row["layer"]: row for row in result.report.tables["prune"]}
    assert rows["grouped"]["in"] == "16 -> 8" and rows["grouped"]["out"] == "24 -> 12"
    assert rows["out"]["status"].startswith("kept: 'output': model output")
    assert rows["inner"]["status"] == "2 of 4 sets removed"  # sets: channel k of each group
    figure = tmp_path / "prune_importance.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["figures"]["prune_importance"] == str(figure)
    assert saved["tables"]["prune"][0]["layer"] == "inner"


def test_pruned_token_model_exports_to_onnx(x, tmp_path):
    torch.manual_seed(0)
    gm = fxcomp.compile(Tokens().eval(), x, passes=[prune(0.5)]).module
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(gm, (x,), path, dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    assert relative_error(torch.from_numpy(out), gm(x)) < 1e-5


class HandAttention(nn.Module):
    """Self-attention written out: separate projections, literal head sizes in ``view``
    and ``reshape``, the batch and length read from the input."""

    def __init__(self, computed_width: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)
        self.computed_width = computed_width

    def forward(self, x):
        x = self.embed(x.flatten(2).transpose(1, 2))  # (N, 64 tokens, 32)
        n, length, width = x.shape
        head = width // 4 if self.computed_width else 8

        def heads(t):
            return t.view(n, length, 4, head).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, 32)
        return self.head((x + self.out(out)).mean(1))


def test_attention_prunes_within_heads(x):
    torch.manual_seed(0)
    model = HandAttention().eval()
    gm = oracle(model, x).module
    assert [gm.get_submodule(n).out_features for n in ("q", "k", "v")] == [16, 16, 16]
    assert gm.get_submodule("out").in_features == 16
    assert (
        "view(getitem, getitem_1, 4, 4)" in gm.code and "reshape(getitem, getitem_1, 16)" in gm.code
    )
    assert gm(torch.randn(5, 3, 8, 8)).shape == (5, 5)
    groups = ChannelGraph.build(fxcomp.trace(model, x)).groups()
    qk = next(g for g in groups if g.values[:2] == ["q", "k"])
    assert qk.sets == 8 and qk.prunable  # one within-head dimension of all 4 heads per set
    # a head width computed in the graph cannot be rewritten: the attention stays whole
    computed = ChannelGraph.build(fxcomp.trace(HandAttention(computed_width=True).eval(), x))
    reasons = [r for g in computed.groups() for r in g.blocked_by]
    assert any("head width is computed in the graph" in r for r in reasons), reasons


@pytest.mark.parametrize("batch_first", [False, True])
def test_unpacked_multihead_attention_prunes_its_heads(batch_first):
    from fxcomp.passes import unpack_attention

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(32)
            self.attention = nn.MultiheadAttention(32, 4, batch_first=batch_first)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            y = self.norm(x)
            return self.head(x + self.attention(y, y, y, need_weights=False)[0])

    torch.manual_seed(0)
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    model = Block().eval()
    blocked = ChannelGraph.build(fxcomp.trace(model, x)).groups()
    assert any("run unpack_attention" in r for g in blocked for r in g.blocked_by)
    gm = oracle(model, x, passes=(unpack_attention(),)).module
    projections = [gm.get_submodule(f"attention.{n}_proj") for n in "qkvo" if n != "o"]
    assert [p.out_features for p in projections] == [16, 16, 16]
    assert gm.get_submodule("attention.out_proj").in_features == 16
    other = torch.randn(3, 9, 32) if batch_first else torch.randn(9, 3, 32)
    assert gm(other).shape == (*other.shape[:2], 5)
