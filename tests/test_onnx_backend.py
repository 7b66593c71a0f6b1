"""The ONNX backend: float and QDQ files that pass onnx.checker, run in ONNX Runtime and agree
with the reference graph; clear errors and no partial file on bad input.

Agreement: ONNX Runtime runs QDQ graphs with integer kernels (requantizing at every step, bias
in int32), so its output differs from the reference graph's float arithmetic; that difference
must stay below the noise quantization itself adds
(``fxcomp.runtime.parity.check_against_reference``: SQNR against the reference at most 3 dB
below the reference's SQNR against float, plus the spread of a noise power measured on the
output's few values). A float file must reproduce the float model at >= 80 dB.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.backends.onnx import backend as onnx_model
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.passes import fuse, observe, quantize
from fxcomp.quant import scheme
from tests.conftest import ResidualNet
from tests.test_quantize_models import inputs, reestimated


def _compile(model, x, engine, tmp_path, calib=None):
    passes = [fuse()]
    if engine is not None:
        passes.append(quantize(calib or [x], engine=engine, progress=False))
    return fxcomp.compile(model, x, passes, backend="onnx", output_dir=tmp_path)


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return randomize_batchnorm(ResidualNet()).eval()


@pytest.fixture
def batches():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(4)]


@pytest.mark.parametrize(
    ("engine", "dtype", "zero_is_zero"),
    [("tensorrt", np.int8, True), ("ort", np.uint8, False)],
)
def test_qdq_file_follows_the_scheme(net, batches, tmp_path, engine, dtype, zero_is_zero):
    result = _compile(net, batches[0], engine, tmp_path, batches)
    model = onnx.load(result.artifact.path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == onnx_model.OPSET
    ops = _ops(result.artifact.path)
    assert not {"Cast", "Identity", "BatchNormalization"} & set(ops)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero = constants[node.input[2]]
            assert zero.dtype == dtype and (not zero_is_zero or zero == 0)
            assert nodes.get(node.input[0]) is None or nodes[node.input[0]].op_type != "Cast"
        if node.op_type in ("Conv", "Gemm"):
            activation, weight = (nodes[i] for i in node.input[:2])
            assert activation.op_type == weight.op_type == "DequantizeLinear"
            integers = constants[weight.input[0]]
            assert integers.dtype == np.int8 and integers.min() >= -127  # symmetric weights
            assert constants[weight.input[1]].shape == (integers.shape[0],)  # per channel
            assert next(a.i for a in weight.attribute if a.name == "axis") == 0
    parity = result.artifact.parity
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3
    if engine == "tensorrt":  # Q/DQ evaluated as written: the reference graph's arithmetic
        assert parity["sqnr_db_vs_reference"] > 60
    assert result.artifact.manifest["engine"] == engine


@pytest.mark.parametrize(("engine", "own_grid"), [("ort", True), ("tensorrt", False)])
def test_average_pooling_takes_its_own_grid_where_the_runtime_has_one(
    net, batches, tmp_path, engine, own_grid
):
    # ONNX Runtime's QLinearGlobalAveragePool has an output scale of its own; the spatial
    # mean of a ReLU map spans a far narrower range than the map, so its grid is finer
    result = _compile(net, batches[0], engine, tmp_path, batches)
    model = onnx.load(result.artifact.path)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    pool = next(n for n in model.graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool"))
    before = producer[pool.input[0]]
    after = next(n for n in model.graph.node if pool.output[0] in n.input)
    assert before.op_type == "DequantizeLinear" and after.op_type == "QuantizeLinear"
    scale_in, scale_out = (float(constants[n.input[1]]) for n in (before, after))
    if own_grid:
        assert scale_out < scale_in / 2
    else:
        assert scale_out == scale_in


def test_ort_weights_take_seven_bits_when_asked(net, batches, tmp_path):
    passes = [fuse(), quantize(batches, engine="ort", reduce_range=True, progress=False)]
    result = fxcomp.compile(net, batches[0], passes, backend="onnx", output_dir=tmp_path)
    model = onnx.load(result.artifact.path)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {o: n for n in model.graph.node for o in n.output}
    weights = [
        constants[nodes[n.input[1]].input[0]] for n in model.graph.node if n.op_type == "Conv"
    ]
    assert len(weights) == 2 and max(int(np.abs(w).max()) for w in weights) == 64
    parity = result.artifact.parity
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3


@pytest.mark.parametrize("saturates", [True, False])
def test_ort_weight_range_follows_the_cpu_unless_given(monkeypatch, saturates):
    monkeypatch.setattr(scheme, "int8_dot_saturates", lambda: saturates)
    one = torch.tensor(1.0)
    scale = {
        given: scheme.scheme_for("ort", reduce_range=given)[1].qparams(-one, one)[0].item()
        for given in (None, True, False)
    }
    assert scale[True] == pytest.approx(1 / 64) and scale[False] == pytest.approx(1 / 127)
    assert scale[None] == scale[saturates]
    assert not scheme.scheme_for("tensorrt")[1].reduce_range  # TensorRT's rule: [-127, 127]


def test_float_file_reproduces_the_model_with_a_dynamic_batch(net, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    result = _compile(net, x, None, tmp_path)
    assert result.artifact.parity["sqnr_db_vs_float"] >= 80
    session = onnx_model.session(result.artifact.path)
    bigger = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = result.module(bigger)
    torch.testing.assert_close(onnx_model.run(session, (bigger,)), expected, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx",
        "report.html",
        "report.json",
        "size_latency.png",
    ]


def test_int8_file_is_about_four_times_smaller(tmp_path, batches):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    float_file = _compile(model, x, None, tmp_path / "f").artifact.path
    int8_file = _compile(model, x, "tensorrt", tmp_path / "q", [torch.randn(4, 3, 64, 64)])
    assert float_file.stat().st_size / int8_file.artifact.path.stat().st_size > 3.9


def test_unfrozen_graph_is_refused_and_no_file_is_left(net, batches, tmp_path):
    with pytest.raises(fxcomp.BackendError, match="still an observer: the graph was not frozen"):
        passes = [fuse(), observe(fxcomp.QuantConfig("tensorrt"))]
        fxcomp.compile(net, batches[0], passes, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_kernel_engines_are_refused(net, batches, tmp_path):
    """compile refuses before any work (the passes' config against the backend); a graph
    that reaches the backend anyway is refused when it emits."""
    untraceable = nn.Sequential(nn.Flatten(), nn.Linear(1, 1))  # would fail in trace
    for lower in (True, False):
        passes = [fuse(), quantize(batches, engine="x86", lower=lower, progress=False)]
        with pytest.raises(fxcomp.BackendError, match="does not take graphs quantized for 'x86'"):
            fxcomp.compile(untraceable, batches[0], passes, "onnx", tmp_path / "x86")
    assert not (tmp_path / "x86").exists()
    backend = BACKENDS["onnx"]
    for lower, message in ((True, "lowered fbgemm/qnnpack kernel"), (False, "7-bit activations")):
        passes = [fuse(), quantize(batches, engine="x86", lower=lower, progress=False)]
        gm = fxcomp.compile(net, batches[0], passes).module
        ctx = fxcomp.CompileContext.from_inputs((batches[0],))
        with pytest.raises(fxcomp.BackendError, match=message):
            backend.emit(gm, ctx, tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_op_without_onnx_mapping_fails_cleanly(tmp_path):
    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x).abs()

    with pytest.raises(fxcomp.BackendError, match="ONNX export failed"):
        fxcomp.compile(Spectral(), torch.randn(2, 8), [], "onnx", tmp_path)
    assert not any(tmp_path.iterdir())


def test_unwritable_directory_fails_and_leaves_nothing(net, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(fxcomp.BackendError, match=r"cannot write to .*file/out: Not a directory"):
        fxcomp.compile(net, torch.randn(1, 3, 16, 16), [fuse()], "onnx", blocker / "out")
    assert blocker.read_text() == "not a directory"


def test_caller_model_is_untouched(net, batches, tmp_path):
    before = copy.deepcopy(net.state_dict())
    _compile(net, batches[0], "ort", tmp_path, batches)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.slow
def test_digits_int8_keeps_its_accuracy_in_onnx_runtime(tmp_path):
    data = load_digits_split()
    model = train(DigitsNet(), data, progress=False)
    calib = [x for x, _ in data.batches(64)[:8]]
    for engine in ("ort", "tensorrt"):
        result = _compile(model, data.test_x[:8], engine, tmp_path / engine, calib)
        reference = accuracy(result.module, data.test_x, data.test_y)
        session = onnx_model.session(result.artifact.path)
        in_ort = accuracy(
            lambda x, session=session: onnx_model.run(session, (x,)), data.test_x, data.test_y
        )
        assert abs(in_ort - reference) <= 0.2, (engine, in_ort, reference)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tensorrt", "ort"])
@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "convnext_tiny",
    ],
)
def test_torchvision_models_export_and_agree_with_the_reference(name, engine, tmp_path):
    data = inputs(name, 3)
    model = reestimated(name, data[:2])
    result = _compile(model, data[0][:2], engine, tmp_path, data[1:])
    onnx.checker.check_model(onnx.load(result.artifact.path), full_check=True)
    parity = result.artifact.parity
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3
    assert _ops(result.artifact.path)["DequantizeLinear"] >= 20


def test_options_opset_and_fp16_weights(net, batches, tmp_path):
    x = batches[0]
    options = {"opset": 13, "fp16_weights": True}
    result = fxcomp.compile(net, x, [fuse()], "onnx", tmp_path / "half", backend_options=options)
    model = onnx.load(result.artifact.path)
    assert model.opset_import[0].version == 13
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert result.artifact.parity["sqnr_db_vs_float"] > 50  # float16 weights: ~60 dB
    with pytest.raises(fxcomp.InputError, match="opset must be an integer from 13"):
        fxcomp.compile(net, x, [fuse()], "onnx", tmp_path / "o", backend_options={"opset": 11})
    with pytest.raises(fxcomp.InputError, match="fp16_weights applies to float models"):
        passes = [fuse(), quantize(batches, engine="ort", progress=False)]
        fxcomp.compile(net, x, passes, "onnx", tmp_path / "qh", backend_options=options)
    with pytest.raises(fxcomp.InputError, match="torchscript backend takes no options"):
        fxcomp.compile(net, x, [], "torchscript", tmp_path / "t", backend_options=options)
