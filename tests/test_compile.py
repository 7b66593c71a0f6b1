"""fxcomp.compile: the caller's model is never changed; the report; what lands on disk."""

from __future__ import annotations

import json

import pytest
import torch

import fxcomp
from fxcomp import BackendError, InputError, Pass, PassError
from fxcomp.passes import cse, dce, fuse, quantize


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


def test_each_pass_records_its_options_in_report_json(residual_net, image, tmp_path):
    from fxcomp.passes import prune, quantize

    data = [torch.randn(2, *image.shape[1:]) for _ in range(2)]
    passes = [fuse(), prune(0.25, ignore=["fc"]), quantize(data, engine="qnnpack", skip=["fc"])]
    fxcomp.compile(residual_net, image, passes, output_dir=tmp_path)
    records = {p["name"]: p for p in json.loads((tmp_path / "report.json").read_text())["passes"]}
    fused = {"fold_batchnorm": True, "group_relu": True, "train_batchnorm": False}
    assert records["fuse"]["options"] == fused
    pruned = records["prune"]["options"]
    assert pruned["ratio"] == 0.25 and pruned["ignore"] == ["fc"] and pruned["steps"] == 1
    assert pruned["loss"] == "cross_entropy" and pruned["importance"] == "l2"
    quantized = records["quantize"]["options"]
    assert quantized["config"] == {
        "engine": "qnnpack",
        "observer": "mse",
        "per_channel": True,
        "reduce_range": None,
        "skip": ["fc"],
    }
    assert quantized["calibration_data"] == "<list of 2>" and quantized["lower"] is True
    steps = {c["name"]: c for c in records["quantize"]["children"]}
    assert steps["insert_observers"]["options"]["config"]["engine"] == "qnnpack"
    assert steps["calibrate"]["options"] == {"data": "<list of 2>", "progress": True}
    assert records["trace"]["options"] == {
        "capture": "symbolic",
        "reason": "symbolic tracing took it",
        "inputs": None,
        "static_axes": [],
    }


def test_the_backend_refuses_the_passes_config_before_any_pass_runs(residual_net, image):
    from fxcomp.passes import quantize

    ran = []
    spy = Pass("spy", lambda gm, ctx: ran.append(1))
    for backend, engine in (("onnx", "x86"), ("torchscript", "tensorrt"), ("mobile", "fbgemm")):
        passes = [spy, quantize([image], engine=engine, lower=False)]
        with pytest.raises(BackendError, match=f"{backend} backend does not take .*'{engine}'"):
            fxcomp.compile(residual_net, image, passes, backend, "unused")
    assert ran == []


def test_one_graph_takes_one_quantization_config(residual_net, image):
    from fxcomp.passes import quantize, quantize_dynamic

    passes = [quantize([image], engine="x86"), quantize_dynamic(engine="qnnpack")]
    with pytest.raises(fxcomp.InputError, match="one graph, one quantization config"):
        fxcomp.compile(residual_net, image, passes, "torchscript", "unused")


def test_the_config_is_stored_once_on_the_graph_and_read_by_every_step(residual_net, image):
    from fxcomp.passes import calibrate, freeze, lower, observe
    from fxcomp.quant.config import QUANT_CONFIG

    config = fxcomp.QuantConfig("qnnpack", observer="minmax", per_channel=False)
    steps = [fuse(), observe(config), calibrate([image], progress=False), freeze(), lower()]
    gm = fxcomp.compile(residual_net, image, steps).module
    assert QUANT_CONFIG.get(gm) == config
    conv = gm.get_submodule("conv")  # lowered for qnnpack, weights per tensor as configured
    assert type(conv).__module__.startswith("torch.ao.nn.quantized")
    assert conv.weight().qscheme() == torch.per_tensor_affine
    other = fxcomp.QuantConfig("x86")
    with pytest.raises(PassError, match="already quantized for .*qnnpack"):
        fxcomp.passes.observe(other)(gm, fxcomp.CompileContext.from_inputs((image,)))


def test_quant_config_is_checked_when_built():
    with pytest.raises(fxcomp.InputError, match="unknown quantization engine 'tpu'"):
        fxcomp.QuantConfig("tpu")
    with pytest.raises(fxcomp.InputError, match="unknown observer 'max'"):
        fxcomp.QuantConfig(observer="max")
    with pytest.raises(fxcomp.InputError, match="skip=\\['fc'\\], not skip='fc'"):
        fxcomp.QuantConfig(skip="fc")
    assert fxcomp.QuantConfig("tensorrt").target.backends == ("onnx", "openvino")
    assert not fxcomp.QuantConfig("ort").target.kernels


def test_compile_works_under_inference_mode(residual_net, image):
    calibration = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    passes = [fuse(), quantize(calibration, progress=False)]
    expected = fxcomp.compile(residual_net, image, passes).module(image)
    with torch.inference_mode():
        x = image.clone()  # an inference tensor, as every input made under the mode is
        result = fxcomp.compile(residual_net, x, passes)
        assert torch.is_inference_mode_enabled()  # the caller's mode is back
        assert torch.equal(result.module(x), expected)


def test_analyze_uses_the_quantizing_pass_data(residual_net, image):
    calibration = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    passes = [fuse(), quantize(calibration, progress=False)]
    result = fxcomp.compile(residual_net, image, passes, analyze=True)
    layers = [row["layer"] for row in result.report.tables["analysis"]]
    assert sorted(layers) == ["conv", "fc", "out", "stem"]
    with pytest.raises(InputError, match="analyze needs calibration data, and no quantizing"):
        fxcomp.compile(residual_net, image, [fuse()], analyze=True)
