"""fxcomp.compile: the caller's model is never changed; the report; what lands on disk."""

from __future__ import annotations

import json

import pytest
import torch

import fxcomp
from fxcomp import BackendError, Pass, PassError
from fxcomp.passes import cse, dce, fuse


def snapshot(model):
    return {
        name: (t, t.detach().clone(), t._version)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }


def test_the_callers_model_is_never_changed(residual_net, image):
    residual_net.train()
    calls = []
    handle = residual_net.conv.register_forward_hook(lambda m, i, o: calls.append(1))
    pre = residual_net.register_forward_pre_hook(lambda m, i: None)
    before = snapshot(residual_net)
    modes = {name: m.training for name, m in residual_net.named_modules()}
    hooks = (dict(residual_net.conv._forward_hooks), dict(residual_net._forward_pre_hooks))

    result = fxcomp.compile(residual_net, image, passes=[fuse(), cse(), dce()])
    result.module(image)

    after = snapshot(residual_net)
    assert before.keys() == after.keys()
    for name, (tensor, value, version) in before.items():
        assert after[name][0] is tensor, name  # identity
        assert tensor._version == version, name  # never written in place
        assert torch.equal(tensor, value), name  # value
    assert {name: m.training for name, m in residual_net.named_modules()} == modes
    assert (dict(residual_net.conv._forward_hooks), dict(residual_net._forward_pre_hooks)) == hooks
    assert calls == []  # compiling never ran the caller's hooks
    handle.remove()
    pre.remove()


def test_report_is_a_table_and_json(residual_net, image):
    result = fxcomp.compile(residual_net, image, passes=[fuse(), dce()])
    data = json.loads(json.dumps(result.report.to_dict()))
    assert [p["name"] for p in data["passes"]] == ["trace", "fuse", "dce"]
    fused = data["passes"][1]
    assert fused["modified"] is True and fused["nodes_before"]["call_module"] == 7
    assert fused["nodes_after"]["call_module"] == 4
    table = str(result.report)
    assert table.splitlines()[0].split() == [
        "pass",
        "modified",
        "ms",
        "nodes",
        "parameters",
        "MiB",
        "notes",
    ]
    assert "fuse" in table and "dce" in table


def test_output_dir_gets_the_report_only_after_success(residual_net, image, tmp_path):
    out = tmp_path / "out"

    def explode(gm, ctx):
        raise RuntimeError("boom")

    with pytest.raises(PassError):
        fxcomp.compile(residual_net, image, [fuse(), Pass("explode", explode)], output_dir=out)
    assert not out.exists()
    fxcomp.compile(residual_net, image, [fuse()], output_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    assert json.loads((out / "report.json").read_text())["passes"][1]["name"] == "fuse"


def test_unknown_backend_is_refused_before_any_work(residual_net, image):
    with pytest.raises(BackendError, match="no backend named 'tensorrt'"):
        fxcomp.compile(residual_net, image, backend="tensorrt")


def test_result_module_is_a_runnable_graph_module(residual_net, image):
    result = fxcomp.compile(residual_net, (image,))
    assert isinstance(result.module, torch.fx.GraphModule) and result.artifact is None
    torch.testing.assert_close(result.module(image), residual_net(image), rtol=0, atol=0)
