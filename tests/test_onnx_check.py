"""The QDQ rules linter (``fxcomp.backends.onnx.check``) and ``fxcomp check``.

fxcomp's own exports are clean for the engine they were made for; each rule, planted into an
otherwise clean export (or a small hand-built graph), is reported once, on the right node;
the INT8 prediction for ``ort`` agrees with the integer kernels ONNX Runtime actually fuses;
a file from ONNX Runtime's own ``quantize_static`` is judged against TensorRT's rules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_static

import fxcomp
from fxcomp.backends.onnx.check import check
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.ir.errors import InputError
from fxcomp.passes import fuse, quantize
from tests.conftest import ResidualNet

ENGINES = ("tensorrt", "ort")
LAYERS = ["/stem/Conv", "/conv/Conv", "/Add", "/fc/Gemm", "/out/Gemm"]  # ResidualNet's
# The tensorrt export feeds the residual Add straight from /conv/Conv (TensorRT fuses them);
# ONNX Runtime runs that Add in float, and says so. The planted-violation tests below start
# from the tensorrt export, so this is all ``ort`` may say of them.
TENSORRT_RESIDUAL = {("add-one-side", "/Add")}


def _batches(shape: tuple[int, ...], count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(count)]


def _export(model: torch.nn.Module, batches: list[torch.Tensor], engine: str, out: Path) -> Path:
    passes = [fuse(), quantize(batches, engine=engine, progress=False)]
    result = fxcomp.compile(model, batches[0], passes=passes, backend="onnx", output_dir=out)
    return result.artifact.path


@pytest.fixture(scope="module")
def residual_exports(tmp_path_factory) -> dict[str, Path]:
    """ResidualNet (conv-bn-relu, residual add + relu, linear-bn-relu head) per engine."""
    torch.manual_seed(0)
    net = randomize_batchnorm(ResidualNet()).eval()
    batches = _batches((8, 3, 16, 16), 2, seed=2)
    return {e: _export(net, batches, e, tmp_path_factory.mktemp(e)) for e in ENGINES}


@pytest.fixture(scope="module")
def resnet18_exports(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    batches = _batches((4, 3, 32, 32), 2, seed=3)
    return {e: _export(net, batches, e, tmp_path_factory.mktemp(f"r18_{e}")) for e in ENGINES}


def _found(result) -> set[tuple[str, str]]:
    return {(v.rule, v.node) for v in result.violations}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_initializer(model: onnx.ModelProto, tensor: onnx.TensorProto) -> None:
    """Replace the initializer named ``tensor.name`` by ``tensor``."""
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == tensor.name)
    model.graph.initializer[index].CopyFrom(tensor)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _insert_after(model: onnx.ModelProto, name: str, *new: onnx.NodeProto) -> None:
    nodes = list(model.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == name) + 1
    nodes[index:index] = new
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _plant_qdq(model: onnx.ModelProto, conv: str, prefix: str) -> None:
    """A Q/DQ pair (the stem's grid) after ``conv``'s output: the Q named "q", its output
    ``{prefix}_q``, the DQ's ``{prefix}_dq`` (rewire the consumer to read it)."""
    scale, zero_point = _node(model, "/stem_qdq/QuantizeLinear").input[1:]
    output = f"{conv}_output_0"
    _insert_after(
        model,
        conv,
        helper.make_node("QuantizeLinear", [output, scale, zero_point], [f"{prefix}_q"], name="q"),
        helper.make_node("DequantizeLinear", [f"{prefix}_q", scale, zero_point], [f"{prefix}_dq"]),
    )


def _remove(model: onnx.ModelProto, *names: str) -> None:
    kept = [n for n in model.graph.node if n.name not in names]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _ort_int8_nodes(model: onnx.ModelProto, tmp_path: Path) -> set[str]:
    """The Conv/Gemm/MatMul/Add nodes ONNX Runtime's CPU provider fuses into integer kernels,
    read from its optimized graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    integer = {"QLinearConv", "QLinearAdd", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}
    return {n.name for n in optimized.graph.node if n.op_type in integer}


# --- 1. fxcomp's own exports are clean ---------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_fxcomp_exports_are_clean_and_run_every_layer_in_int8(residual_exports, engine):
    result = check(residual_exports[engine], engine)
    assert result.ok, result.table()
    assert result.int8_nodes == LAYERS
    assert "no violations" in result.table()


def test_resnet18_export_for_tensorrt_is_clean_and_all_int8(resnet18_exports):
    path = resnet18_exports["tensorrt"]
    result = check(path, "tensorrt")
    assert result.ok, result.table()
    convs = [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    assert len(convs) == 20 and set(convs) <= set(result.int8_nodes)
    # every Conv, the 8 residual adds and the classifier: DQ -> MaxPool -> Conv and
    # DQ -> Reshape -> Gemm count as quantized inputs, since TensorRT moves DQ past both
    assert len(result.int8_nodes) == len(result.predictions) == 29


def test_ort_prediction_agrees_with_the_kernels_onnx_runtime_fuses(
    residual_exports, resnet18_exports, tmp_path
):
    """ONNX Runtime moves a DequantizeLinear past MaxPool and Reshape (not past Flatten, which
    fxcomp therefore exports as Reshape): in fxcomp's resnet18 export for ort the 20 Convs,
    8 Adds and the classifier run as QLinearConv/QLinearAdd/QGemm, as predicted."""
    residual = onnx.load(residual_exports["ort"])
    resnet = onnx.load(resnet18_exports["ort"])
    for model in (residual, resnet):
        predicted = set(check(model, "ort").int8_nodes)
        assert predicted == _ort_int8_nodes(model, tmp_path)
    result = check(resnet, "ort")
    assert result.ok, result.table()
    assert len(result.int8_nodes) == 29 and "/fc/Gemm" in result.int8_nodes


# --- 2. planted violations, one rule each ------------------------------------------------


def test_non_zero_zero_point(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    zero_point = _node(model, "/x_qdq/QuantizeLinear").input[2]
    _set_initializer(model, numpy_helper.from_array(np.array(3, np.int8), zero_point))
    result = check(model, "tensorrt")
    assert _found(result) == {
        ("zero-point", "/x_qdq/QuantizeLinear"),
        ("zero-point", "/x_qdq/DequantizeLinear"),
    }
    assert "[3], not 0" in result.violations[0].message
    assert _found(check(model, "ort")) == TENSORRT_RESIDUAL  # affine: any zero point will do


def test_uint8_qdq_for_tensorrt(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    zero_point = _node(model, "/stem_qdq/QuantizeLinear").input[2]
    _set_initializer(model, numpy_helper.from_array(np.array(0, np.uint8), zero_point))
    result = check(model, "tensorrt")
    assert _found(result) == {
        ("dtype", "/stem_qdq/QuantizeLinear"),
        ("dtype", "/stem_qdq/DequantizeLinear"),
    }
    assert result.violations[0].message.startswith("uint8 Q/DQ")
    assert _found(check(model, "ort")) == TENSORRT_RESIDUAL


@pytest.mark.parametrize(
    "data_type", [TensorProto.INT16, TensorProto.UINT16, TensorProto.FLOAT8E4M3FN]
)
def test_types_other_than_8_bit_integers_for_ort(residual_exports, data_type):
    model = onnx.load(residual_exports["ort"])
    zero_point = _node(model, "/conv_qdq/QuantizeLinear").input[2]
    _set_initializer(model, helper.make_tensor(zero_point, data_type, [], [0]))
    result = check(model, "ort")
    assert _found(result) == {
        ("dtype", "/conv_qdq/QuantizeLinear"),
        ("dtype", "/conv_qdq/DequantizeLinear"),
    }
    assert helper.tensor_dtype_to_string(data_type).split(".")[1].lower() in str(result.violations)


def test_int8_weight_holding_minus_128(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    name = _node(model, "/conv/DequantizeLinear").input[0]
    weight = _initializer(model, name).copy()
    assert weight.min() >= -127  # fxcomp's weights are symmetric
    weight[0, 0, 0, 0] = -128
    _set_initializer(model, numpy_helper.from_array(weight, name))
    result = check(model, "tensorrt")
    assert _found(result) == {("weight-range", "/conv/DequantizeLinear")}
    assert "/conv/Conv holds -128 (1 values)" in result.violations[0].message
    assert _found(check(model, "ort")) == TENSORRT_RESIDUAL


def test_per_tensor_conv_weight_for_tensorrt(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    dq = _node(model, "/conv/DequantizeLinear")
    scale = _initializer(model, dq.input[1]).max()
    _set_initializer(model, numpy_helper.from_array(np.array(scale, np.float32), dq.input[1]))
    _set_initializer(model, numpy_helper.from_array(np.array(0, np.int8), dq.input[2]))
    result = check(model, "tensorrt")
    assert _found(result) == {("per-channel", "/conv/DequantizeLinear")}
    assert _found(check(model, "ort")) == TENSORRT_RESIDUAL


@pytest.mark.parametrize(
    ("dq_name", "axis"),
    [("/conv/DequantizeLinear", 1), ("/conv/DequantizeLinear", None), ("/fc/DequantizeLinear", 1)],
)
def test_per_channel_weight_on_the_wrong_axis(residual_exports, dq_name, axis):
    """axis=None drops the attribute, whose ONNX default is 1, not the Conv's 0."""
    model = onnx.load(residual_exports["tensorrt"])
    dq = _node(model, dq_name)
    del dq.attribute[:]
    if axis is not None:
        dq.attribute.append(helper.make_attribute("axis", axis))
    for engine in ENGINES:
        result = check(model, engine)
        residual = TENSORRT_RESIDUAL if engine == "ort" else set()
        assert _found(result) == {("axis", dq_name)} | residual
        axis_message = next(v.message for v in result.violations if v.rule == "axis")
        assert "along axis 1, not its output-channel axis 0" in axis_message


def _matmul_model(axis: int) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul(DQ(int8 W of shape (K, N), per channel along ``axis``))."""
    weight = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.full(3, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_dq"),
        helper.make_node(
            "DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], name="w_dq", axis=axis
        ),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("axis", "expected"), [(1, set()), (-1, set()), (0, {("axis", "w_dq")})])
def test_matmul_weight_is_per_channel_along_its_last_axis(axis, expected):
    result = check(_matmul_model(axis), "tensorrt")
    assert _found(result) == expected
    assert result.int8_nodes == ["matmul"]


def test_float_activation_into_a_quantized_conv(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    _node(model, "/conv/Conv").input[0] = "/stem/Relu_output_0"  # skip the stem's Q/DQ
    result = check(model, "tensorrt")
    assert _found(result) == {("unquantized-input", "/conv/Conv")}
    assert "activation input /stem/Relu_output_0 does not" in result.violations[0].message
    assert result.int8_nodes == [n for n in LAYERS if n != "/conv/Conv"]


def test_residual_add_quantized_on_one_side_for_ort(residual_exports, tmp_path):
    model = onnx.load(residual_exports["ort"])
    _remove(model, "/conv_qdq/QuantizeLinear", "/conv_qdq/DequantizeLinear")
    _node(model, "/Add").input[1] = "/conv/Conv_output_0"
    result = check(model, "ort")
    assert _found(result) == {("add-one-side", "/Add")}
    assert "/conv/Conv_output_0 does not" in result.violations[0].message
    # ONNX Runtime also needs a QuantizeLinear after a Conv to fuse it (QLinearConv)
    int8 = ["/stem/Conv", "/fc/Gemm", "/out/Gemm"]
    assert result.int8_nodes == int8
    assert set(int8) == _ort_int8_nodes(model, tmp_path)


def test_tensorrt_residual_add_fuses_with_its_conv_and_is_int8(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    add = _node(model, "/Add")
    conv_side = list(add.input).index("/conv/Conv_output_0")  # no Q/DQ between them
    assert _node(model, "/stem_qdq/DequantizeLinear").output[0] == add.input[1 - conv_side]
    result = check(model, "tensorrt")
    assert result.ok
    fused = next(p for p in result.predictions if p.node == "/Add")
    assert fused.int8 and "fused into Conv /conv/Conv as its residual" in fused.reason


def test_qdq_between_conv_and_residual_add_for_tensorrt(residual_exports):
    """TensorRT's guide: a Q/DQ pair on the Conv output feeding a residual Add splits
    Conv + Add; fxcomp's own file has none there, so plant one."""
    model = onnx.load(residual_exports["tensorrt"])
    add = _node(model, "/Add")
    add.input[list(add.input).index("/conv/Conv_output_0")] = "split_dq"
    _plant_qdq(model, "/conv/Conv", "split")
    result = check(model, "tensorrt")
    assert _found(result) == {("residual-split", "q")}
    message = result.violations[0].message
    assert "between Conv /conv/Conv and the residual Add /Add" in message
    assert "quantize only the Add's other input" in message
    assert check(model, "ort").ok  # ONNX Runtime fuses QLinearConv + QLinearAdd this way


def test_float_residual_that_is_not_a_conv_output_for_tensorrt(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    add = _node(model, "/Add")
    add.input[list(add.input).index("/conv/Conv_output_0")] = "relu_out"
    _insert_after(
        model, "/conv/Conv", helper.make_node("Relu", ["/conv/Conv_output_0"], ["relu_out"])
    )
    result = check(model, "tensorrt")
    assert _found(result) == {("add-one-side", "/Add")}
    assert "relu_out does not" in result.violations[0].message


def test_qdq_between_conv_and_relu_for_tensorrt(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    _node(model, "/stem/Relu").input[0] = "inner_dq"
    _plant_qdq(model, "/stem/Conv", "inner")
    result = check(model, "tensorrt")
    assert _found(result) == {("qdq-inside-fusion", "q")}
    assert "between Conv /stem/Conv and Relu /stem/Relu" in result.violations[0].message


def test_opset_below_13(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    model.opset_import[0].version = 12
    for engine in ENGINES:
        result = check(model, engine)
        residual = TENSORRT_RESIDUAL if engine == "ort" else set()
        assert _found(result) == {("opset", "(model)")} | residual
        assert "opset is 12" in result.violations[0].message


def test_batchnorm_left_in_a_quantized_graph_for_tensorrt(residual_exports):
    model = onnx.load(residual_exports["tensorrt"])
    channels = np.ones(8, np.float32)
    model.graph.initializer.extend(
        numpy_helper.from_array(channels * value, f"bn_{name}")
        for name, value in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))
    )
    _node(model, "/stem/Relu").input[0] = "bn_out"
    bn_inputs = ["/stem/Conv_output_0", "bn_scale", "bn_bias", "bn_mean", "bn_var"]
    bn = helper.make_node("BatchNormalization", bn_inputs, ["bn_out"], name="/stem/bn")
    _insert_after(model, "/stem/Conv", bn)
    result = check(model, "tensorrt")
    assert _found(result) == {("unfolded-bn", "/stem/bn")}
    assert _found(check(model, "ort")) == TENSORRT_RESIDUAL


def test_unreadable_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        check(tmp_path / "missing.onnx", "tensorrt")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="cannot read .* as an ONNX model"):
        check(garbage, "ort")
    with pytest.raises(InputError, match="unknown target 'trt'"):
        check(_matmul_model(1), "trt")


# --- 3. a file from ONNX Runtime's own quantizer -----------------------------------------


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._feeds = iter([{"input": b.numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def test_onnxruntime_quantize_static_defaults_against_tensorrt(tmp_path):
    """ONNX Runtime 1.32's ``quantize_static`` with default settings writes QDQ with int8
    *asymmetric* activations (older versions defaulted to uint8), per-tensor symmetric int8
    weights, and int32 biases behind DequantizeLinear; it removes the Relus (folded into
    the zero point). Against TensorRT that is: ``zero-point`` on every activation Q/DQ,
    ``dtype`` on the four int32 bias DequantizeLinears, ``per-channel`` on both Conv weights,
    ``residual-split`` on the Q/DQ between the block's Conv and its residual Add; no
    ``weight-range`` (its weights are in [-127, 127]). Against ort it is clean."""
    torch.manual_seed(0)
    net = randomize_batchnorm(ResidualNet()).eval()
    batches = _batches((8, 3, 16, 16), 3, seed=4)
    float_file = fxcomp.compile(
        net, batches[0], passes=[fuse()], backend="onnx", output_dir=tmp_path / "float"
    ).artifact.path
    path = tmp_path / "ort_qdq.onnx"
    quantize_static(str(float_file), str(path), _Reader(batches))
    model = onnx.load(path)
    constants = {t.name: t for t in model.graph.initializer}
    activation_qdq = {
        n.name
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in constants
    }
    bias_dq = {
        n.name
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and constants.get(n.input[0], TensorProto()).data_type == TensorProto.INT32
    }
    result = check(path, "tensorrt")
    by_rule: dict[str, set[str]] = {}
    for v in result.violations:
        by_rule.setdefault(v.rule, set()).add(v.node)
    assert set(by_rule) == {"zero-point", "dtype", "per-channel", "residual-split"}
    (split,) = by_rule["residual-split"]
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "stem" not in n.name)
    assert next(n for n in model.graph.node if n.name == split).input[0] == conv.output[0]
    assert by_rule["zero-point"] == activation_qdq and len(activation_qdq) == 14
    assert by_rule["dtype"] == bias_dq and len(bias_dq) == 4
    assert by_rule["per-channel"] == {
        "stem.conv.weight_DequantizeLinear",
        "conv.weight_DequantizeLinear",
    }
    assert len(result.int8_nodes) == 5  # structurally every layer is still quantized
    assert check(path, "ort").ok


# --- 4. the command line -----------------------------------------------------------------


def fxcomp_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxcomp", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_exits_0_when_clean(residual_exports):
    run = fxcomp_cli("check", str(residual_exports["ort"]), "--target", "ort", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["ok"] is True and data["violations"] == []
    assert data["int8_nodes"] == LAYERS


def test_cli_exits_1_and_names_rule_and_node_on_violations(residual_exports, tmp_path):
    model = onnx.load(residual_exports["tensorrt"])
    zero_point = _node(model, "/x_qdq/QuantizeLinear").input[2]
    _set_initializer(model, numpy_helper.from_array(np.array(5, np.int8), zero_point))
    onnx.save(model, tmp_path / "bad.onnx")
    run = fxcomp_cli("check", str(tmp_path / "bad.onnx"), "--target", "tensorrt")
    assert run.returncode == 1, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    assert ["zero-point", "/x_qdq/QuantizeLinear"] in [row[:2] for row in rows]
    assert "INT8 prediction (5 of 5 layers)" in run.stdout


def test_cli_exits_2_with_one_error_line_for_a_missing_file(tmp_path):
    run = fxcomp_cli("check", str(tmp_path / "missing.onnx"), "--target", "tensorrt")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[0] == f"error: no such file: {tmp_path / 'missing.onnx'}"
    assert len(lines) <= 2 and all(line.startswith(("error:", "hint:")) for line in lines)
    assert "Traceback" not in run.stderr and run.stdout == ""
