"""Pass manager: ordering, failures, lint, honest `modified`, nesting, hooks, records."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx import GraphModule

import fxcomp
from fxcomp import (
    CompileContext,
    Pass,
    PassError,
    PassManager,
    PassOrderError,
    PassResult,
    Pipeline,
)
from fxcomp.passes import cse, dce, fuse


def noop(gm: GraphModule, ctx: CompileContext) -> PassResult:
    return PassResult(gm, modified=False)


def double_output(gm: GraphModule, ctx: CompileContext) -> None:
    """In-place user pass that returns None: multiplies the output by 2."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    value = output.args[0]
    with gm.graph.inserting_before(output):
        doubled = gm.graph.call_function(operator.mul, (value, 2))
    output.args = (doubled,)


def test_ordering_violation_names_both_passes():
    first = Pass("first", noop, run_before=("second",))
    second = Pass("second", noop)
    PassManager([first, second])  # fine
    with pytest.raises(PassOrderError) as info:
        PassManager([second, first])
    assert "'first' must run before 'second'" in str(info.value)
    assert "declared by 'first'" in str(info.value)


def test_run_after_violation_inside_a_nested_pipeline():
    late = Pass("late", noop, run_after=("early",))
    with pytest.raises(PassOrderError, match="'early' must run before 'late'.*declared by 'late'"):
        PassManager([Pipeline("group", [late]), Pass("early", noop)])
    PassManager([Pass("early", noop), Pipeline("group", [late])])


def test_cycle_names_both_passes():
    a = Pass("a", noop, run_before=("b",))
    b = Pass("b", noop, run_before=("a",))
    with pytest.raises(PassOrderError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        PassManager([a, b])


def test_failing_pass_raises_pass_error_naming_it_and_the_passes_before(residual_net, image):
    def explode(gm, ctx):
        raise ValueError("boom")

    with pytest.raises(PassError) as info:
        fxcomp.compile(residual_net, image, passes=[fuse(), Pass("explode", explode)])
    err = info.value
    assert err.pass_name == "explode" and err.previous == ("trace", "fuse")
    assert "pass 'explode' failed (after trace, fuse): ValueError: boom" in str(err)
    assert isinstance(err.__cause__, ValueError)


def test_unsupported_graph_error_names_the_node(residual_net, image):
    def refuse(gm, ctx):
        node = gm.graph.find_nodes(op="call_module", target="conv")[0]
        raise fxcomp.UnsupportedGraphError(node, "no rule for this conv")

    with pytest.raises(PassError) as info:
        fxcomp.compile(residual_net, image, passes=[Pass("refuse", refuse)])
    assert info.value.node == "conv"
    assert "node 'conv' (" in str(info.value) and "self.conv(x)" in str(info.value)


def test_lint_runs_after_each_pass(residual_net, image):
    def break_graph(gm, ctx):
        conv = gm.graph.find_nodes(op="call_module", target="conv")[0]
        conv.target = "missing_module"
        return PassResult(gm, modified=True)

    with pytest.raises(PassError, match="'break_graph' left an invalid graph.*missing_module"):
        fxcomp.compile(residual_net, image, passes=[break_graph])


def test_modified_is_computed_for_user_passes(residual_net, image, ctx):
    gm = fxcomp.trace(residual_net, image)
    result, records = PassManager([double_output, lambda gm, ctx: gm]).run(gm, ctx)
    assert [r.modified for r in records] == [True, False]
    torch.testing.assert_close(result.graph_module(image), 2 * residual_net(image))
    new = result.graph_module.graph.find_nodes(op="call_function", target=operator.mul)[0]
    assert new.meta["fxcomp_pass"] == "double_output"
    assert new.meta["tensor_meta"].shape == (2, 3)


def test_modified_counts_in_place_weight_changes(residual_net, image, ctx):
    def scale_weights(gm, ctx):
        with torch.no_grad():
            gm.get_submodule("conv").weight.mul_(2)

    gm = fxcomp.trace(residual_net, image)
    _, records = PassManager([scale_weights]).run(gm, ctx)
    assert records[0].modified


def test_claiming_unmodified_after_a_change_is_an_error(residual_net, image):
    def liar(gm, ctx):
        double_output(gm, ctx)
        return PassResult(gm, modified=False)

    with pytest.raises(PassError, match="returned modified=False but changed the module"):
        fxcomp.compile(residual_net, image, passes=[liar])


def test_postcondition_is_checked_on_the_returned_module(residual_net, image):
    checked = Pass("checked", noop, postcondition=lambda gm, ctx: "conv is still there")
    with pytest.raises(PassError, match="'checked' broke its postcondition.*conv is still there"):
        fxcomp.compile(residual_net, image, passes=[checked])


def test_a_pass_that_breaks_execution_is_caught(residual_net, image):
    def bad_shape(gm, ctx):
        output = next(iter(gm.graph.find_nodes(op="output")))
        with gm.graph.inserting_before(output):
            node = gm.graph.call_method("view", (output.args[0], 7, -1))
        output.args = (node,)

    with pytest.raises(PassError, match="'bad_shape' no longer runs.*node 'view'"):
        fxcomp.compile(residual_net, image, passes=[bad_shape])


def test_pipelines_nest_and_record_children(residual_net, image):
    cleanup = Pipeline("cleanup", [cse(), dce()])
    outer = Pipeline("optimize", [fuse(), cleanup])
    result = fxcomp.compile(residual_net, image, passes=[outer])
    top = result.report.records[1]
    assert top.name == "optimize" and top.modified
    assert [c.name for c in top.children] == ["fuse", "cleanup"]
    assert [c.path for c in top.children[1].children] == [
        "optimize/cleanup/cse",
        "optimize/cleanup/dce",
    ]
    assert result.report.find("optimize/cleanup/dce") is None
    assert result.report.find("dce").path == "optimize/cleanup/dce"
    torch.testing.assert_close(result.module(image), residual_net(image), rtol=1e-4, atol=1e-5)


def test_a_pass_or_pipeline_is_itself_callable(residual_net, image, ctx):
    gm = fxcomp.trace(residual_net, image)
    assert fuse()(gm, ctx).modified
    assert not Pipeline("again", [fuse()])(gm, ctx).modified


def test_hooks_run_around_every_pass_including_nested(residual_net, image):
    seen = []
    result = fxcomp.compile(
        residual_net,
        image,
        passes=[fuse(), Pipeline("cleanup", [cse(), dce()])],
        before_pass=[lambda p, gm, ctx: seen.append(("before", p.name))],
        after_pass=[lambda record, gm, ctx: seen.append(("after", record.path))],
    )
    assert seen == [
        ("after", "trace"),
        ("before", "fuse"),
        ("after", "fuse"),
        ("before", "cleanup"),
        ("before", "cse"),
        ("after", "cleanup/cse"),
        ("before", "dce"),
        ("after", "cleanup/dce"),
        ("after", "cleanup"),
    ]
    assert (
        result.report.find("fuse").nodes_after["call_module"]
        < result.report.find("fuse").nodes_before["call_module"]
    )


def test_records_hold_time_nodes_and_sizes(residual_net, image):
    result = fxcomp.compile(residual_net, image, passes=[fuse()])
    record = result.report.find("fuse")
    assert record.seconds > 0
    bn_params = sum(
        p.numel()
        for m in (residual_net.stem_bn, residual_net.bn, residual_net.fc_bn)
        for p in m.parameters()
    )
    # the stem conv had no bias: folding adds one of 8
    assert record.parameters_before - record.parameters_after == bn_params - 8
    assert record.bytes_after < record.bytes_before


def test_sizes_count_packed_dynamic_kernels():
    """Dynamic kernels hold their int8 weights packed (a Linear's (weight, bias) pair, an
    LSTM's cell parameters), not as parameters: the records count them all the same."""
    from fxcomp.passes import quantize_dynamic

    class Reader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    result = fxcomp.compile(Reader().eval(), torch.randn(2, 8, 8), passes=[quantize_dynamic()])
    record = result.report.find("quantize_dynamic")
    int8_weights = 4 * 32 * (8 + 32) + 10 * 32
    assert record.parameters_after == int8_weights
    assert record.bytes_before == 4 * record.parameters_before  # float32 throughout
    # int8 weights, float biases and one float64 scale and int64 zero point per channel
    assert int8_weights < record.bytes_after < 0.5 * record.bytes_before


def test_non_callable_pass_is_rejected():
    with pytest.raises(fxcomp.InputError, match="a pass must be callable"):
        PassManager(["fuse"])


def test_wrong_return_type_is_a_pass_error(residual_net, image):
    with pytest.raises(PassError, match="returned int; expected PassResult"):
        fxcomp.compile(residual_net, image, passes=[lambda gm, ctx: 3])
