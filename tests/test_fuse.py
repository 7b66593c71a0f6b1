"""fuse: BN folding and ReLU grouping; structure, honest `modified`, idempotence, numerics.

Numerical tolerance: outputs agree within 1e-5 relative (max abs difference over max abs
reference): folding rounds each weight once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcomp
from fxcomp import PassManager
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.nn.fused import ConvBN, ConvReLU, LinearReLU, add_relu
from fxcomp.passes import fuse
from tests.conftest import relative_error

TOLERANCE = 1e-5


def modules_of(gm, kind):
    return [name for name, m in gm.named_modules() if type(m) is kind]


def run_fuse(model, x, **options):
    return fxcomp.compile(model, x, passes=[fuse(**options)])


def test_structure_after_fuse(residual_net, image):
    gm = run_fuse(residual_net, image).module
    assert not [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert modules_of(gm, ConvReLU) == ["stem"]
    assert modules_of(gm, LinearReLU) == ["fc"]
    assert modules_of(gm, nn.Conv2d) == ["stem.conv", "conv"]
    assert len(gm.graph.find_nodes(op="call_function", target=add_relu)) == 1
    assert not gm.graph.find_nodes(op="call_function", target=torch.relu)
    made_by = {n.name: n.meta["fxcomp_pass"] for n in gm.graph.nodes if n.op == "call_module"}
    assert made_by == {"stem": "fuse", "conv": "fuse", "fc": "fuse", "out": "trace"}
    add = gm.graph.find_nodes(op="call_function", target=add_relu)[0]
    assert add.meta["tensor_meta"].shape == (2, 8, 16, 16)


def test_numerics(residual_net, image):
    gm = run_fuse(residual_net, image).module
    assert relative_error(gm(image), residual_net(image)) < TOLERANCE
    other = torch.randn(5, 3, 11, 9)  # any shape the model accepts, not just the example
    assert relative_error(gm(other), residual_net(other)) < TOLERANCE


def test_second_run_changes_nothing(residual_net, image, ctx):
    gm = run_fuse(residual_net, image).module
    before = gm.code
    result, records = PassManager([fuse()]).run(gm, ctx)
    assert not records[0].modified and result.graph_module.code == before


def test_modified_false_when_nothing_to_fuse(image):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.AvgPool2d(2)).eval()
    result = run_fuse(model, image)
    assert not result.report.find("fuse").modified
    assert result.module.code == fxcomp.trace(model, image).code


def test_options_select_the_rules(residual_net, image):
    folded = run_fuse(residual_net, image, group_relu=False).module
    assert not modules_of(folded, ConvReLU) and not modules_of(folded, nn.BatchNorm2d)
    grouped = run_fuse(residual_net, image, fold_batchnorm=False).module
    assert modules_of(grouped, nn.BatchNorm2d) == ["stem_bn", "bn"]
    assert not modules_of(grouped, ConvReLU)  # relu follows BN, which stays
    assert len(grouped.graph.find_nodes(op="call_function", target=add_relu)) == 1


class Tapped(nn.Module):
    """The conv output feeds the BN and a second branch, so folding must not happen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_bn_with_shared_conv_output_is_not_folded_and_the_note_says_why(image):
    model = randomize_batchnorm(Tapped()).eval()
    result = run_fuse(model, image)
    assert modules_of(result.module, nn.BatchNorm2d) == ["bn"]
    assert relative_error(result.module(image), model(image)) < TOLERANCE
    notes = [n for n in result.report.notes if n.rule == "fold_batchnorm"]
    assert len(notes) == 1 and notes[0].node == "bn"
    assert "the output of 'conv' is also used by 'bn', 'add'" in notes[0].reason
    assert notes[0].source.endswith("`return self.bn(y) + y`")
    table = fxcomp.render_graph(result.module, notes=result.report.notes)
    assert "fold_batchnorm not applied at 'bn'" in table


class Reused(nn.Module):
    """One conv module called twice; one BN after the first call only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(F.relu(self.bn(self.conv(x))))


def test_module_called_twice_is_not_folded(image):
    model = randomize_batchnorm(Reused()).eval()
    x = torch.randn(1, 4, 8, 8)
    result = run_fuse(model, x)
    assert modules_of(result.module, nn.BatchNorm2d) == ["bn"]
    assert relative_error(result.module(x), model(x)) < TOLERANCE
    assert any("called from 2 places" in n.reason for n in result.report.notes)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


def test_tied_weights_are_not_folded(image):
    model = randomize_batchnorm(Tied()).eval()
    result = run_fuse(model, image)
    assert relative_error(result.module(image), model(image)) < TOLERANCE
    assert any("is shared with" in n.reason for n in result.report.notes)


def test_linear_bn1d_folds_only_for_2d_outputs():
    seq = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(4)).eval()  # BN over dim 1 of (N, 4, 5)
    randomize_batchnorm(seq)
    x = torch.randn(3, 4, 6)
    result = run_fuse(seq, x)
    assert modules_of(result.module, nn.BatchNorm1d) == ["1"]
    assert "2-D (batch, features)" in result.report.notes[0].reason
    assert relative_error(result.module(x), seq(x)) < TOLERANCE


def test_conv1d_conv3d_and_bias_free_convs_fold():
    for conv, bn, x in (
        (nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4), torch.randn(2, 3, 10)),
        (nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4, affine=False), torch.randn(2, 3, 5, 5, 5)),
        (nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), torch.randn(2, 4, 6, 6)),
    ):
        model = randomize_batchnorm(nn.Sequential(conv, bn, nn.ReLU())).eval()
        gm = run_fuse(model, x).module
        assert modules_of(gm, ConvReLU) == ["0"], type(conv)
        assert relative_error(gm(x), model(x)) < TOLERANCE


def test_conv_transpose_and_train_mode_stats_are_left_alone(image):
    model = nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),
    ).eval()
    result = run_fuse(model, image)
    assert modules_of(result.module, nn.BatchNorm2d) == ["1", "3"]
    reasons = " | ".join(n.reason for n in result.report.notes)
    assert "not a Conv2d" in reasons and "no running statistics" in reasons
    assert relative_error(result.module(image), model(image)) < TOLERANCE


class ReluForms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.l1 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.c1(x), inplace=True)
        x = self.c2(x).relu_()
        x = torch.relu(self.c3(x) + x)
        return self.l1(x).relu()


def test_every_relu_form_is_grouped(image):
    model = ReluForms().eval()
    result = run_fuse(model, image)
    gm = result.module
    assert modules_of(gm, ConvReLU) == ["c1", "c2"] and modules_of(gm, LinearReLU) == ["l1"]
    assert len(gm.graph.find_nodes(op="call_function", target=add_relu)) == 1
    assert relative_error(gm(image), model(image)) < TOLERANCE


def test_relu_after_other_ops_says_why(image):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(2), nn.ReLU()).eval()
    result = run_fuse(model, image)
    assert not result.report.find("fuse").modified
    (note,) = result.report.notes
    assert note.rule == "group_relu" and "not a Conv, Linear or tensor add" in note.reason


def test_train_batchnorm_groups_conv_bn_relu_and_folds_later(residual_net, image, ctx):
    randomize_batchnorm(residual_net)
    gm = run_fuse(residual_net, image, train_batchnorm=True).module
    units = {name: m for name, m in gm.named_modules() if type(m) is ConvBN}
    assert set(units) == {"stem", "conv", "fc"}  # fc: a Linear with a BatchNorm1d
    assert units["stem"].relu and units["fc"].relu and not units["conv"].relu
    assert isinstance(units["stem"].bn, nn.BatchNorm2d)
    assert relative_error(gm(image), residual_net(image)) < TOLERANCE
    _, records = PassManager([fuse(train_batchnorm=True)]).run(gm, ctx)
    assert not records[0].modified
    x = torch.randn(2, 3, 16, 16)
    expected = F.relu(residual_net.stem_bn(residual_net.stem(x)))
    folded = units["stem"].folded()
    assert isinstance(folded, ConvReLU) and folded.conv is units["stem"].conv
    assert relative_error(folded(x), expected) < TOLERANCE
    assert isinstance(units["fc"].folded(), LinearReLU)


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm subclass whose forward calls ``F.batch_norm``
    on its own tensors, then an activation child."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


def test_batchnorm_subclass_folds_into_its_conv_and_prunes(image):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), BatchNormAct(16), nn.Conv2d(16, 8, 3), BatchNormAct(8)
    )
    randomize_batchnorm(model)
    model.eval()
    convs = sum(p.numel() for m in model if isinstance(m, nn.Conv2d) for p in m.parameters())
    result = run_fuse(model, image)
    gm = result.module
    assert not [n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # only the convolutions' weights and biases are left: no dead BatchNorm tensor
    assert sum(p.numel() for p in gm.parameters()) == convs
    assert not list(gm.buffers())
    assert type(gm.get_submodule("1")) is nn.Module  # kept only to hold its act
    with torch.no_grad():
        assert relative_error(gm(image), model(image)) < TOLERANCE
    assert all(type(m) is BatchNormAct for m in model[1::2])  # the caller's model is untouched
    pruned = fxcomp.compile(model, image, passes=[fxcomp.passes.prune(0.5)]).report
    assert pruned.find("prune").parameters_after < 0.75 * pruned.find("prune").parameters_before


class FunctionalNorm(nn.Module):
    """A convolution followed by ``F.batch_norm`` on tensors the model holds itself."""

    def __init__(self, training: bool = False, computed: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.gamma = nn.Parameter(torch.randn(8))
        self.beta = nn.Parameter(torch.randn(8))
        self.training_stats, self.computed = training, computed

    def forward(self, x):
        var = self.var + x.mean() if self.computed else self.var  # depends on the input
        y = F.batch_norm(self.conv(x), self.mean, var, self.gamma, self.beta, self.training_stats)
        return F.relu(y)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_functional_batch_norm_on_model_tensors_folds(image, capture):
    model = FunctionalNorm().eval()
    result = fxcomp.compile(model, image, passes=[fuse()], capture=capture)
    gm = result.module
    assert not [n for n in gm.graph.nodes if n.target is F.batch_norm]
    assert modules_of(gm, ConvReLU) == ["conv"]  # folded, then grouped with its ReLU
    # the statistics, gamma and beta went into the convolution: only its tensors are left
    assert sum(p.numel() for p in gm.parameters()) == 8 * 3 * 9 + 8
    assert not list(gm.buffers())
    with torch.no_grad():
        assert relative_error(gm(image), model(image)) < TOLERANCE
    assert model.gamma.shape == (8,) and model.mean.shape == (8,)  # the caller's model


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"training": True}, "own statistics (training=True: a model in train mode"),
        ({"computed": True}, "batch_norm's running_var is computed in the graph ('add')"),
    ],
)
def test_functional_batch_norm_that_cannot_fold_says_why(image, options, reason):
    model = FunctionalNorm(**options).eval()
    result = run_fuse(model, image)
    assert len(result.module.graph.find_nodes(op="call_function", target=F.batch_norm)) == 1
    notes = [n for n in result.report.notes if n.rule == "batchnorm_module"]
    assert len(notes) == 1 and reason in notes[0].reason, notes
    assert notes[0].source.endswith("self.training_stats)`")
    with torch.no_grad():
        assert relative_error(result.module(image), model(image)) < TOLERANCE


def test_batch_norm_before_its_convolution_is_named(image):
    model = randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))).eval()
    result = run_fuse(model, image)
    notes = [n for n in result.report.notes if n.rule == "fold_batchnorm"]
    assert [n.node for n in notes] == ["_0"]
    reason = notes[0].reason
    assert "input comes from 'input_1' (input)" in reason and "not a Conv2d" in reason
