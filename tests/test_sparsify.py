"""Unstructured pruning: exact counts, the torch.nn.utils.prune oracle, honest ``modified``.

The oracle: ``prune.global_unstructured(..., L1Unstructured)`` then ``prune.remove`` on a copy
of the same model picks the same weights (random weights have no ties), so the weights are
equal and the outputs agree within 1e-6 absolute.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx import GraphModule
from torch.nn.utils import prune

import fxcomp
from fxcomp import CompileContext, Pass, PassManager
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.nn.fused import ConvReLU, weighted_layer
from fxcomp.passes import fuse, quantize, sparsify
from fxcomp.passes.sparsity import lowest, weight_tensors

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


class Net(nn.Module):
    """Two convs and two linear layers; default init gives distinct random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class ConvBnNet(nn.Module):
    """Conv-BN-ReLU twice and a head: ``fuse`` makes ConvReLU units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Conv/Linear weights of ``model`` by the name of the module that holds them."""
    return {n: weighted_layer(m).weight for n, m in model.named_modules() if weighted_layer(m)}


def torch_pruned(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` pruned by torch.nn.utils.prune (global L1) with the masks removed."""
    model = copy.deepcopy(model)
    layers = {weighted_layer(m) for m in model.modules()} - {None}
    params = [(layer, "weight") for layer in layers]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for layer, name in params:
        prune.remove(layer, name)
    return model


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def rerun(gm: GraphModule, *passes: Pass) -> bool:
    """Run ``passes`` on ``gm`` in place with a fresh context; whether they modified it."""
    result, _ = PassManager(passes).run(gm, CompileContext.from_inputs((torch.zeros(1, 3, 8, 8),)))
    return result.modified


@pytest.mark.parametrize("amount", [0.3, 0.75])
def test_global_l1_matches_torch_prune(net, x, amount):
    base = fxcomp.trace(net, x)
    result = fxcomp.compile(net, x, passes=[sparsify(amount)])
    gm = result.module
    assert result.report.find("sparsify").modified
    assert str(gm.graph) == str(base.graph)  # structure: only values change
    reference = torch_pruned(net, amount)
    after, expected = layer_weights(gm), layer_weights(reference)
    for name in LAYERS:
        assert torch.equal(after[name], expected[name]), name
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=0, atol=1e-6)
    n = sum(w.numel() for w in after.values())
    assert sum(zeros(w) for w in after.values()) == round(amount * n)


def test_global_scope_zeroes_the_smallest_weights_across_layers(net, x):
    gm = fxcomp.compile(net, x, passes=[sparsify(0.5)]).module
    before, after = layer_weights(net), layer_weights(gm)
    zeroed = torch.cat([before[k].detach()[after[k] == 0].abs() for k in LAYERS])
    kept = torch.cat([before[k].detach()[after[k] != 0].abs() for k in LAYERS])
    assert zeroed.max() <= kept.min()
    per_layer = {k: zeros(after[k]) / after[k].numel() for k in LAYERS}
    assert len(set(per_layer.values())) > 1  # one threshold, not the same share per layer


@pytest.mark.parametrize("importance", ["l1", "random"])
def test_local_scope_zeroes_amount_of_each_layer(net, x, importance):
    gm = fxcomp.compile(net, x, passes=[sparsify(0.4, scope="local", importance=importance)])
    after = layer_weights(gm.module)
    for name in LAYERS:
        assert zeros(after[name]) == round(0.4 * after[name].numel()), name
    if importance == "l1":
        reference = copy.deepcopy(net)
        for name in LAYERS:
            prune.l1_unstructured(reference.get_submodule(name), "weight", amount=0.4)
            prune.remove(reference.get_submodule(name), "weight")
        for name, weight in layer_weights(reference).items():
            assert torch.equal(after[name], weight), name


def test_random_importance_is_seeded_and_exact(net, x):
    def mask(seed: int) -> list[torch.Tensor]:
        gm = fxcomp.compile(net, x, passes=[sparsify(0.5, importance="random", seed=seed)])
        return [w == 0 for w in layer_weights(gm.module).values()]

    first, again, other = mask(0), mask(0), mask(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    n = sum(m.numel() for m in first)
    assert sum(int(m.sum()) for m in first) == sum(int(m.sum()) for m in other) == round(n / 2)
    l1 = [w == 0 for w in layer_weights(torch_pruned(net, 0.5)).values()]
    assert not all(torch.equal(a, b) for a, b in zip(first, l1, strict=True))


def test_amount_zero_is_the_identity(net, x):
    result = fxcomp.compile(net, x, passes=[sparsify(0.0)])
    assert not result.report.find("sparsify").modified
    torch.testing.assert_close(result.module(x), net(x), rtol=0, atol=0)
    assert all(row["zeros"] == 0 for row in result.report.tables["sparsify"])


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("importance", ["l1", "random"])
def test_second_run_changes_nothing(net, x, scope, importance):
    gm = fxcomp.compile(net, x, passes=[sparsify(0.5, scope=scope, importance=importance)]).module
    state = copy.deepcopy(gm.state_dict())
    assert not rerun(gm, sparsify(0.5, scope=scope, importance=importance, seed=7))
    assert not rerun(gm, sparsify(0.2, scope=scope, importance=importance))  # already sparser
    for key, value in gm.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert rerun(gm, sparsify(0.7, scope=scope, importance=importance))
    after = layer_weights(gm).values()
    if scope == "global":
        assert sum(zeros(w) for w in after) == round(0.7 * sum(w.numel() for w in after))
    else:
        assert all(zeros(w) == round(0.7 * w.numel()) for w in after)


def test_report_table_lists_every_layer(net, x):
    report = fxcomp.compile(net, x, passes=[sparsify(0.5, scope="local")]).report
    rows = report.tables["sparsify"]
    assert [row["layer"] for row in rows] == LAYERS
    for row, layer in zip(rows, layer_weights(net).values(), strict=True):
        n = layer.numel()
        assert (row["weights"], row["zeros"]) == (n, round(0.5 * n))
        assert row["sparsity"] == f"{round(0.5 * n) / n:.3f}"
    text = report.table("sparsify")
    assert text.splitlines()[0].split() == ["layer", "weights", "zeros", "sparsity"]
    assert "fc1" in text and "0.500" in text


def test_caller_model_and_state_dict_keys_are_unchanged(net, x):
    before = copy.deepcopy(net.state_dict())
    gm = fxcomp.compile(net, x, passes=[sparsify(0.9)]).module
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert list(gm.state_dict()) == list(fxcomp.trace(net, x).state_dict())
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in gm.state_dict())
    assert not any(m._forward_pre_hooks for m in gm.modules())
    assert all(isinstance(w, nn.Parameter) for w in layer_weights(gm).values())


def test_biases_and_batchnorm_are_kept(x):
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnNet()).eval()
    gm = fxcomp.compile(model, x, passes=[sparsify(0.8)]).module
    for name, value in gm.state_dict().items():
        if not name.endswith("weight") or name.startswith("bn"):
            assert zeros(value) == zeros(model.state_dict()[name]), name


def test_after_fuse_sparsifies_the_layers_inside_fused_units(x):
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnNet()).eval()
    fused = fxcomp.compile(model, x, passes=[fuse()]).module
    result = fxcomp.compile(model, x, passes=[fuse(), sparsify(0.5)])
    gm = result.module
    assert isinstance(gm.get_submodule("conv1"), ConvReLU)
    rows = result.report.tables["sparsify"]
    assert [row["layer"] for row in rows] == ["conv1", "conv2", "fc"]
    n = sum(row["weights"] for row in rows)
    assert sum(row["zeros"] for row in rows) == round(0.5 * n)
    assert zeros(gm.get_submodule("conv1").conv.weight) > 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x), torch_pruned(fused, 0.5)(x), rtol=0, atol=1e-6)


def test_tied_weights_are_counted_once(x):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(6, 6)
            self.decode = nn.Linear(6, 6)
            self.decode.weight = self.encode.weight
            self.head = nn.Linear(6, 2)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.head(self.decode(torch.relu(self.encode(v))))

    torch.manual_seed(0)
    v = torch.randn(3, 6)
    result = fxcomp.compile(Tied().eval(), v, passes=[sparsify(0.5)])
    gm = result.module
    assert gm.get_submodule("decode").weight is gm.get_submodule("encode").weight
    assert list(weight_tensors(gm)) == ["encode", "head"]
    rows = result.report.tables["sparsify"]
    assert [(r["layer"], r["weights"]) for r in rows] == [("encode", 36), ("head", 12)]
    assert sum(r["zeros"] for r in rows) == 24  # of 48 distinct weights, not 42 of 84


def test_ties_are_broken_by_index_and_the_count_is_exact():
    mask = lowest(torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0]), 2)
    assert mask.tolist() == [False, True, True, False, False]
    assert not lowest(torch.ones(4), 0).any()
    assert int(lowest(torch.ones(7), 3).sum()) == 3


def test_bad_arguments_give_clear_errors(net, x):
    cases = [
        (sparsify(1.0), r"pass 'sparsify' failed.*amount must be in \[0, 1\), got 1.0"),
        (sparsify(-0.1), r"amount must be in \[0, 1\), got -0.1"),
        (sparsify("half"), "amount must be a number, got 'half'"),
        (sparsify(0.5, scope="layer"), "unknown sparsify scope 'layer'"),
        (sparsify(0.5, importance="l2"), "unknown sparsify importance 'l2'"),
    ]
    for bad, message in cases:
        with pytest.raises(fxcomp.PassError, match=message) as info:
            fxcomp.compile(net, x, passes=[bad])
        assert info.value.pass_name == "sparsify"
        assert isinstance(info.value.__cause__, fxcomp.InputError)


def test_runs_before_quantize(x):
    with pytest.raises(fxcomp.PassOrderError, match="'sparsify' must run before 'quantize'"):
        PassManager([quantize([x]), sparsify(0.5)])


def test_resnet18_reaches_half_sparsity_globally():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    result = fxcomp.compile(model, torch.randn(1, 3, 32, 32), passes=[sparsify(0.5)])
    weights = layer_weights(result.module)
    assert len(weights) == 21  # 20 convs and the classifier
    n = sum(w.numel() for w in weights.values())
    assert n == sum(w.numel() for w in layer_weights(model).values())
    assert sum(zeros(w) for w in weights.values()) == round(0.5 * n)
    assert len(result.report.tables["sparsify"]) == 21
