"""dce and cse: structure, honest `modified`, idempotence, and exact numerics
(they change no arithmetic).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import fxcomp
from fxcomp import PassManager
from fxcomp.passes import cse, dce
from fxcomp.passes.dead_code import eliminate_dead_code


class Wasteful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        self.unused(x)  # value dropped
        a = x.view(-1, 4) * 2
        b = x.view(-1, 4) * 2  # same as a
        return self.used(a) + self.used(b)


def compile_with(model, x, *passes):
    return fxcomp.compile(model, x, passes=list(passes))


def test_dce_removes_unused_nodes_and_modules():
    model, x = Wasteful().eval(), torch.randn(3, 4)
    result = compile_with(model, x, dce())
    gm = result.module
    assert not gm.graph.find_nodes(op="call_module", target="unused")
    assert not hasattr(gm, "unused")
    assert result.report.find("dce").modified
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_cse_merges_repeated_work_then_dce_is_a_no_op():
    model, x = Wasteful().eval(), torch.randn(3, 4)
    result = compile_with(model, x, dce(), cse(), dce())
    gm = result.module
    assert len(gm.graph.find_nodes(op="call_method", target="view")) == 1
    assert len(gm.graph.find_nodes(op="call_function", target=operator.mul)) == 1
    assert len(gm.graph.find_nodes(op="call_module", target="used")) == 1
    records = result.report.records
    assert [r.modified for r in records[1:]] == [True, True, False]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_second_runs_change_nothing():
    model, x = Wasteful().eval(), torch.randn(3, 4)
    gm = compile_with(model, x, cse(), dce()).module
    ctx = fxcomp.CompileContext.from_inputs((x,))
    _, records = PassManager([cse(), dce()]).run(gm, ctx)
    assert [r.modified for r in records] == [False, False]


class Effects(nn.Module):
    """Unused values whose computation mutates an input, and random or stateful repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = x * 1
        y.add_(1)  # unused result, mutates y
        self.act(y)  # unused result, mutates y in place
        z = y.clone()
        noise = torch.rand_like(z) + torch.rand_like(z)  # two different draws
        return z + noise * 0 + self.drop(z) + self.drop(z) + self.bn(z) + self.bn(z)


def test_side_effects_and_random_or_stateful_ops_are_kept():
    model, x = Effects().eval(), torch.randn(3, 4)
    result = compile_with(model, x, cse(), dce())
    gm = result.module
    assert len(gm.graph.find_nodes(op="call_method", target="add_")) == 1
    assert len(gm.graph.find_nodes(op="call_module", target="act")) == 1
    assert len(gm.graph.find_nodes(op="call_function", target=torch.rand_like)) == 2
    assert len(gm.graph.find_nodes(op="call_module", target="drop")) == 2
    assert len(gm.graph.find_nodes(op="call_module", target="bn")) == 2
    assert not any(r.modified for r in result.report.records[1:])
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_functional_dropout_and_inplace_keyword_are_not_merged():
    class Model(nn.Module):
        def forward(self, x):
            a = F.dropout(x, 0.5, training=self.training)
            b = F.dropout(x, 0.5, training=self.training)
            F.relu(x, inplace=True)
            return a + b

    gm = compile_with(Model().eval(), torch.randn(2, 2), cse(), dce()).module
    assert len(gm.graph.find_nodes(op="call_function", target=F.dropout)) == 2
    assert len(gm.graph.find_nodes(op="call_function", target=F.relu)) == 1


def test_cse_does_not_merge_different_constants():
    class Model(nn.Module):
        def forward(self, x):
            return (
                x.sum(dim=0) + x.sum(dim=1).sum() + x.sum(dim=0) + x[:, 0:1].sum() + x[:, 0:2].sum()
            )

    model, x = Model(), torch.randn(3, 3)
    gm = compile_with(model, x, cse()).module
    assert len(gm.graph.find_nodes(op="call_method", target="sum")) == 5  # 6 sums, one repeat
    assert len(gm.graph.find_nodes(op="call_function", target=operator.getitem)) == 2
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_setitem_counts_as_a_side_effect():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(operator.setitem, (x, 0, 0.0))
    graph.output(x)
    gm = torch.fx.GraphModule(nn.Module(), graph)
    assert not eliminate_dead_code(gm, fxcomp.CompileContext.from_inputs(())).modified
    assert len(gm.graph.find_nodes(op="call_function", target=operator.setitem)) == 1
