"""The OpenVINO backend: IR bundles from float graphs and from ``openvino``, ``ort`` and
``tensorrt`` reference graphs, verified in OpenVINO's runtime.

Tolerances: a float IR in f32 reproduces the compiled graph within 1e-5 relative (OpenVINO's
float kernels add in another order); an INT8 IR is within the reference graph's own
quantization noise of it (``checked_parity``: OpenVINO requantizes between its INT8 kernels
where the reference graph rounds once per Q/DQ pair), and each bundle reproduces its samples
within the manifest's ``atol``. The digits model's INT8 test accuracy in OpenVINO equals the
reference graph's within 0.2 points.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torchvision
from fresh_bundles import assert_reproduce_in_a_fresh_process, rewrite_bundle, run_cli
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS, check_request
from fxcomp.backends.bundle import MANIFEST, OPENVINO, PROGRAMS, SAMPLES
from fxcomp.backends.bundle_manifest import FILENAME
from fxcomp.backends.openvino.backend import _execution
from fxcomp.backends.openvino.runtime import _capabilities
from fxcomp.cli.calibration_data import photo_crops
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.ir.errors import BackendError, InputError
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.passes import fuse, quantize, quantize_dynamic
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.pipeline import calibrate, observe
from fxcomp.quant.reference import QuantDequant

XML, BIN = PROGRAMS[OPENVINO]
THREADS = {"threads": 2}


def int8(data, engine="openvino", **options):
    return quantize(data, engine=engine, progress=False, **options)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=False)
    result = fxcomp.compile(
        model,
        data.test_x[:1],
        [fuse(), int8([x for x, _ in data.batches()])],
        backend="openvino",
        output_dir=tmp_path_factory.mktemp("digits"),
        backend_options={"labels": [str(d) for d in range(10)], **THREADS},
    )
    return data, model, result


def test_digits_ir_keeps_int8_accuracy_and_describes_itself(digits):
    data, model, result = digits
    bundle = fxcomp.load_bundle(result.artifact.path)
    reference = accuracy(result.module, data.test_x, data.test_y)
    assert accuracy(model, data.test_x, data.test_y) > 95
    assert abs(accuracy(bundle, data.test_x, data.test_y) - reference) <= 0.2
    manifest = bundle.manifest
    assert manifest["runtime"] == "openvino" and manifest["engine"] == "openvino"
    assert manifest["versions"]["openvino"].startswith("2026.")
    assert manifest["openvino"]["settings"] == {
        "precision": "f32",
        "hint": "latency",
        "streams": None,
        "threads": 2,
    }
    # OpenVINO's execution graph runs the three convolutions and the classifier in INT8
    assert manifest["openvino"]["layers"] == {"u8": 4}
    assert manifest["openvino"]["float_layers"] == [] and manifest["notes"] == []
    assert manifest["inputs"][0]["dynamic_axes"] == [0] and manifest["labels"][3] == "3"
    layers = manifest["layers"]
    assert [layer["precision"] for layer in layers] == ["int8"] * len(layers)
    assert layers[0]["output"]["dtype"] == "quint8"
    with zipfile.ZipFile(result.artifact.path) as archive:
        assert sorted(archive.namelist()) == sorted([MANIFEST, XML, BIN, SAMPLES])
        for member in (XML, BIN):
            digest = hashlib.sha256(archive.read(member)).hexdigest()
            assert manifest["members"][member]["sha256"] == digest
    assert bundle.verify() == [0.0]


def test_float_ir_reproduces_the_graph_at_other_batch_sizes(residual_net, image, tmp_path):
    result = fxcomp.compile(residual_net, image, [fuse()], "openvino", tmp_path)
    bundle = BACKENDS["openvino"].load(result.artifact)
    assert bundle.manifest["engine"] is None
    assert set(bundle.manifest["openvino"]["layers"]) == {"f32"}
    assert result.artifact.parity["sqnr_db_vs_reference"] > 80
    for rows in (1, 2, 5, 16):
        x = torch.randn(rows, 3, 16, 16)
        torch.testing.assert_close(bundle(x), result.module(x), rtol=1e-5, atol=1e-5)


def test_bf16_is_an_explicit_recorded_choice(residual_net, image, tmp_path):
    options = {"precision": "bf16"}
    if "BF16" not in _capabilities():  # the CPU decides whether it can be honoured
        with pytest.raises(InputError, match="no bf16 support"):
            fxcomp.compile(
                residual_net, image, [fuse()], "openvino", tmp_path, backend_options=options
            )
        return
    result = fxcomp.compile(
        residual_net, image, [fuse()], "openvino", tmp_path, backend_options=options
    )
    manifest = result.artifact.manifest
    assert manifest["openvino"]["settings"]["precision"] == "bf16"
    assert set(manifest["openvino"]["layers"]) == {"bf16"}
    assert 20 < result.artifact.parity["sqnr_db_vs_reference"] < 80  # bf16 rounding, not f32


@pytest.mark.parametrize("engine", ["openvino", "ort", "tensorrt"])
def test_int8_graphs_of_every_qdq_engine_run_in_int8(residual_net, image, tmp_path, engine):
    data = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    passes = [fuse(), int8(data, engine)]
    result = fxcomp.compile(
        residual_net, image, passes, "openvino", tmp_path, backend_options=THREADS
    )
    manifest, parity = result.artifact.manifest, result.artifact.parity
    assert manifest["engine"] == engine
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3
    assert manifest["openvino"]["float_layers"] == [], manifest["openvino"]
    assert sum(manifest["openvino"]["layers"].values()) == 4  # stem, conv, fc, out


def test_openvino_grids_have_zero_points_of_0_unsigned_where_nothing_is_negative(
    residual_net, image
):
    """OpenVINO's INT8 convolutions pay a compensation term for a zero point: every grid of
    the openvino engine is symmetric, uint8 from 0 after a ReLU, int8 where values are
    signed (the input, the residual branch before the add)."""
    gm = fxcomp.compile(residual_net, image, [fuse(), int8([image])]).module
    steps = {name: m for name, m in gm.named_modules() if isinstance(m, QuantDequant)}
    assert all(int(m.zero_point) == 0 for m in steps.values())
    dtypes = {m.scheme.dtype for m in steps.values()}
    assert dtypes == {torch.quint8, torch.qint8}
    for m in steps.values():  # each grid's sign follows what it holds
        lo, hi = m.scheme.qmin * float(m.scale), m.scheme.qmax * float(m.scale)
        assert (lo < 0) == (m.scheme.dtype == torch.qint8) and hi > 0


class SqueezeExcite(nn.Module):
    """A convolution with SiLU, then a gate convolution with a hard sigmoid: activations
    OpenVINO fuses into a convolution when no Q/DQ step separates them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = nn.Conv2d(8, 8, 1)
        self.act = nn.SiLU()
        self.sigmoid = nn.Hardsigmoid()

    def forward(self, x):
        y = self.act(self.conv(x))
        return y * self.sigmoid(self.gate(y))


@pytest.mark.parametrize(("engine", "fused"), [("openvino", True), ("ort", False)])
def test_openvino_engine_fuses_activations_into_the_convolution(image, tmp_path, engine, fused):
    result = fxcomp.compile(SqueezeExcite().eval(), image, [int8([image], engine)])
    gm = result.module
    users = {
        str(node.target): next(iter(node.users))
        for node in gm.graph.nodes
        if node.op == "call_module" and node.target in ("conv", "gate")
    }
    for conv, user in users.items():
        between = isinstance(gm.get_submodule(str(user.target)), QuantDequant)
        assert between is not fused, conv
    if fused:  # and OpenVINO runs both convolutions in INT8
        passes = [int8([image], engine)]
        artifact = fxcomp.compile(SqueezeExcite().eval(), image, passes, "openvino", tmp_path)
        assert artifact.artifact.manifest["openvino"]["float_layers"] == []


def test_a_quantized_layer_run_in_float_is_named():
    """The note comes from OpenVINO's execution graph: a stand-in for a compiled model whose
    runtime model runs one convolution in u8 and one in f32."""

    def op(kind, precision, names):
        info = {"layerType": kind, "runtimePrecision": precision, "originalLayersNames": names}
        info = {k: SimpleNamespace(astype=lambda _t, v=v: v) for k, v in info.items()}
        return SimpleNamespace(get_rt_info=lambda: info)

    ops = [op("Convolution", "u8", "/stem/Conv"), op("Convolution", "f32", "/head/Conv")]
    ops.append(op("Eltwise", "f32", "/add"))
    runtime = SimpleNamespace(get_ordered_ops=lambda: ops)
    compiled = SimpleNamespace(get_runtime_model=lambda: runtime)
    execution, notes = _execution(compiled, quantized=True)
    assert execution == {"layers": {"u8": 1, "f32": 1}, "float_layers": ["/head/Conv"]}
    assert notes == ["OpenVINO runs the quantized layer '/head/Conv' in f32, not INT8"]
    assert _execution(compiled, quantized=False)[1] == []


def test_graphs_for_kernel_engines_are_refused_before_any_work(residual_net, image, tmp_path):
    passes = [fuse(), quantize([image], engine="x86", progress=False)]
    with pytest.raises(BackendError, match="does not take graphs quantized for 'x86'"):
        fxcomp.compile(residual_net, image, passes, "openvino", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_still_observing_or_lowered_is_refused_without_a_file(
    residual_net, image, tmp_path
):
    ctx = fxcomp.CompileContext.from_inputs((image,))
    observing = [fuse(), observe(QuantConfig("openvino")), calibrate([image])]
    gm = fxcomp.compile(residual_net, image, observing).module
    with pytest.raises(BackendError, match="calibrated but not frozen"):
        BACKENDS["openvino"].emit(gm, ctx, tmp_path)
    lowered = fxcomp.compile(residual_net, image, [fuse(), quantize([image])]).module
    with pytest.raises(BackendError, match="lowered to fbgemm/qnnpack kernels"):
        BACKENDS["openvino"].emit(lowered, ctx, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_dynamically_quantized_graph_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    gm = fxcomp.compile(model, x, [quantize_dynamic(engine="ort")]).module
    with pytest.raises(BackendError, match="dynamically quantized"):
        BACKENDS["openvino"].emit(gm, fxcomp.CompileContext.from_inputs((x,)), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "f16"}, "inference precision must be one of f32, bf16"),
        ({"hint": "fast"}, "performance hint must be one of latency, throughput"),
        ({"threads": 0}, "threads must be a positive integer"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, message):
    with pytest.raises(InputError, match=message):
        check_request("openvino", [fuse()], options)


def test_without_openvino_the_backend_says_how_to_get_it(without_module):
    without_module("openvino")
    with pytest.raises(BackendError, match="needs OpenVINO") as err:
        check_request("openvino", [fuse()])
    assert "pip install 'fxcomp[openvino]'" in str(err.value)


def _flip_weights(manifest, members):
    weights = bytearray(members[BIN])
    weights[len(weights) // 2] ^= 1
    members[BIN] = bytes(weights)


def _garble_xml(manifest, members):
    """A damaged IR whose checksum was made to match: OpenVINO must refuse it."""
    members[XML] = members[XML].replace(b"<layers>", b"<layers><oops>", 1)
    manifest["members"][XML]["sha256"] = hashlib.sha256(members[XML]).hexdigest()


@pytest.mark.parametrize(
    ("change", "message"),
    [(_flip_weights, "sha256 of 'model.bin'"), (_garble_xml, "OpenVINO cannot load")],
)
def test_a_damaged_bundle_is_refused_naming_what_is_wrong(digits, tmp_path, change, message):
    damaged = rewrite_bundle(digits[2].artifact.path, tmp_path / "damaged.fxbundle", change)
    with pytest.raises(BackendError, match=message):
        fxcomp.load_bundle(damaged)


def test_cli_compiles_an_openvino_bundle_times_it_apart_and_inspect_reruns_it(tmp_path):
    run = run_cli(
        "compile", "fxcomp.cli.digits:DigitsNet", "--input-shape", "1,1,8,8", "--calib",
        "digits", "--engine", "openvino", "--backend", "openvino", "--threads", "2",
        "--latency-rounds", "3", "-o", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.search(r"latency openvino +[\d.]+ ms", run.stdout)
    assert "pause and one untimed call at each change of pool" in run.stdout
    run = run_cli("inspect", str(tmp_path / FILENAME))
    assert run.returncode == 0, run.stderr
    assert re.search(r"runtime +openvino", run.stdout)
    assert re.search(r"model\.bin +[\d.]+ MiB", run.stdout)
    assert "samples: reproduced (max abs error 0," in run.stdout
    run = run_cli(
        "compile", "fxcomp.cli.digits:DigitsNet", "--input-shape", "1,1,8,8",
        "--backend", "onnx", "--threads", "2", "-o", str(tmp_path / "onnx"),
    )  # fmt: skip
    assert run.returncode != 0 and "--threads apply to --backend openvino only" in run.stderr


@pytest.mark.slow
def test_torchvision_irs_run_int8_and_reload_in_a_fresh_process(tmp_path):
    paths = []
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_large"]:
        crops = photo_crops((1, 3, 224, 224), 12)
        torch.manual_seed(0)
        model = reestimate_batchnorm(torchvision.models.get_model(name, weights=None), [crops[:4]])
        passes = [fuse(), int8([crops[4:8], crops[8:]])]
        result = fxcomp.compile(model, crops[4:5], passes, "openvino", tmp_path / name)
        parity, manifest = result.artifact.parity, result.artifact.manifest
        assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3, name
        assert manifest["openvino"]["float_layers"] == [], name
        assert manifest["notes"] == [], name
        paths.append(str(result.artifact.path))
    assert_reproduce_in_a_fresh_process(paths)
