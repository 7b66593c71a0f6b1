"""The mobile backend: lite-interpreter bundles that load in a fresh process and reproduce
their samples, their manifest, their size, and the refusal of damaged or foreign bundles.

Tolerances: a bundle must reproduce its own samples within the manifest's ``atol`` (one
step of the output's INT8 grid; observed exactly 0 on this machine). The digits bundle's
test accuracy equals the INT8 reference graph's within 0.2 points.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from fresh_bundles import assert_reproduce_in_a_fresh_process, run_cli
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.backends.bundle import FORMAT, LITE, MANIFEST, PROGRAMS, SAMPLES
from fxcomp.backends.bundle_manifest import FILENAME
from fxcomp.cli.calibration_data import photo_crops
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.ir.errors import BackendError, InputError
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.passes import fuse, quantize

(MODEL,) = PROGRAMS[LITE]
DIGIT_LABELS = [str(d) for d in range(10)]


def qnnpack(data, **options):
    return quantize(data, engine="qnnpack", progress=False, **options)


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=False)
    out = tmp_path_factory.mktemp("digits")
    result = fxcomp.compile(
        model,
        data.test_x[:1],
        [fuse(), qnnpack([x for x, _ in data.batches()])],
        backend="mobile",
        output_dir=out,
        backend_options={"labels": DIGIT_LABELS, "mean": [0.0], "std": [1.0]},
    )
    return data, model, result


def test_digits_bundle_keeps_int8_accuracy_and_describes_itself(digits_bundle):
    data, model, result = digits_bundle
    bundle = fxcomp.load_bundle(result.artifact.path)
    reference = accuracy(result.module, data.test_x, data.test_y)
    assert accuracy(model, data.test_x, data.test_y) > 95
    assert abs(accuracy(bundle, data.test_x, data.test_y) - reference) <= 0.2
    manifest = bundle.manifest
    assert manifest["format"] == FORMAT
    assert manifest["engine"] == "qnnpack"
    assert manifest["inputs"] == [
        {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32", "dynamic_axes": [0]}
    ]
    assert manifest["outputs"][0]["shape"] == [1, 10]
    assert manifest["labels"] == DIGIT_LABELS
    assert manifest["preprocessing"] == {"mean": [0.0], "std": [1.0]}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["bytecode_version"] == torch.jit.mobile._get_model_bytecode_version(
        _member_file(result.artifact.path, MODEL)
    )
    convs = [layer for layer in manifest["layers"] if layer["op"] in ("Conv2d", "ConvReLU2d")]
    assert convs and all(layer["precision"] == "int8" for layer in convs)
    assert all(layer["weight"]["qscheme"].startswith("per_channel") for layer in convs)
    assert manifest["samples"]["atol_is"] == "one step of the output's INT8 grid"
    assert bundle.verify() == [0.0]
    with zipfile.ZipFile(result.artifact.path) as archive:
        assert sorted(archive.namelist()) == sorted([MANIFEST, MODEL, SAMPLES])
        digest = hashlib.sha256(archive.read(MODEL)).hexdigest()
    assert manifest["members"][MODEL]["sha256"] == digest


def _member_file(path: Path, name: str) -> Path:
    target = path.parent / f"extracted-{name}"
    with zipfile.ZipFile(path) as archive:
        target.write_bytes(archive.read(name))
    return target


def test_optimize_for_mobile_is_used_where_xnnpack_exists(
    residual_net, image, tmp_path, monkeypatch
):
    result = fxcomp.compile(
        residual_net, image, [fuse(), qnnpack([image])], "mobile", tmp_path / "plain"
    )
    reason = "this torch build has no XNNPACK"
    if not torch._C._is_xnnpack_enabled():  # this machine's build
        assert result.artifact.manifest["optimize_for_mobile"] == {
            "applied": False,
            "reason": reason,
        }
        assert f"optimize_for_mobile skipped: {reason}" in str(result.report)
    called = []

    def optimize_for_mobile(module):
        called.append(module)
        return module

    monkeypatch.setattr(torch._C, "_is_xnnpack_enabled", lambda: True)
    monkeypatch.setattr("torch.utils.mobile_optimizer.optimize_for_mobile", optimize_for_mobile)
    result = fxcomp.compile(residual_net, image, [fuse(), qnnpack([image])], "mobile", tmp_path)
    assert len(called) == 1
    assert result.artifact.manifest["optimize_for_mobile"] == {"applied": True}
    assert result.artifact.manifest["notes"] == []


def test_float_bundle_reproduces_the_compiled_graph(residual_net, image, tmp_path):
    result = fxcomp.compile(residual_net, image, [fuse()], "mobile", tmp_path)
    bundle = BACKENDS["mobile"].load(result.artifact)
    assert bundle.manifest["engine"] is None
    assert {layer["precision"] for layer in bundle.manifest["layers"]} == {"float"}
    torch.testing.assert_close(bundle(image), result.module(image), rtol=1e-5, atol=1e-6)
    bigger = torch.cat([image, image])
    torch.testing.assert_close(bundle(bigger), result.module(bigger), rtol=1e-5, atol=1e-6)


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 14 * 14, 5)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(2, -1))


def test_a_baked_batch_size_is_marked_fixed(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    result = fxcomp.compile(FixedBatch().eval(), x, [fuse(), qnnpack([x])], "mobile", tmp_path)
    manifest = result.artifact.manifest
    assert manifest["inputs"][0]["dynamic_axes"] == []
    assert manifest["outputs"][0]["dynamic_axes"] == []


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        (
            lambda x: [fuse(), quantize([x], engine="x86", progress=False)],
            "does not take graphs quantized for 'x86'",
        ),
        (lambda x: [fuse(), qnnpack([x], lower=False)], "was not lowered"),
    ],
)
def test_graphs_a_phone_cannot_run_are_refused_without_a_file(
    residual_net, image, tmp_path, passes, message
):
    with pytest.raises(BackendError, match=message):
        fxcomp.compile(residual_net, image, passes(image), "mobile", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_packed_for_x86_that_reaches_the_backend_is_refused(residual_net, image, tmp_path):
    """compile refuses the request before any work; a graph that reaches the backend
    anyway (passes that declare no config) is refused when it emits, with no file."""
    passes = [fuse(), quantize([image], engine="x86", progress=False)]
    gm = fxcomp.compile(residual_net, image, passes).module
    with pytest.raises(BackendError, match="packed for 'x86'"):
        BACKENDS["mobile"].emit(gm, fxcomp.CompileContext.from_inputs((image,)), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mean": [0.5, 0.5, 0.5]}, "mean and std together"),
        ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "2 channels"),
        ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, "std must be positive"),
        ({"labels": ["a", "b"]}, "2 labels for an output of shape"),
    ],
)
def test_options_that_do_not_fit_the_model(residual_net, image, tmp_path, options, message):
    with pytest.raises(InputError, match=message):
        fxcomp.compile(residual_net, image, [fuse()], "mobile", tmp_path, backend_options=options)
    assert not (tmp_path / FILENAME).exists()
    with pytest.raises(TypeError, match="shape"):
        fxcomp.compile(residual_net, image, [], "mobile", tmp_path, backend_options={"shape": 1})


def _rewrite(source: Path, target: Path, change) -> Path:
    """Copy a bundle, letting ``change(name, data)`` alter (or drop, returning None) members."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


def _manifest_edit(edit):
    def change(name, data):
        if name != MANIFEST:
            return data
        manifest = json.loads(data)
        edit(manifest)
        return json.dumps(manifest)

    return change


def _flip(source: Path, target: Path, offset: int) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0x5A
    target.write_bytes(bytes(data))
    return target


def _set_format(manifest):
    manifest["format"] = FORMAT + 1


def _set_checksum(manifest):
    manifest["members"][MODEL]["sha256"] = "0" * 64


def _set_bytecode(manifest):
    manifest["bytecode_version"] = 99


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p, t: _flip(p, t, p.stat().st_size // 2), "damaged|not a readable bundle"),
        (lambda p, t: _flip(p, t, p.stat().st_size - 10), "not a readable bundle"),
        (
            lambda p, t: t.write_bytes(p.read_bytes()[: p.stat().st_size // 3]) and t,
            "not a readable",
        ),
        (
            lambda p, t: _rewrite(p, t, lambda n, d: None if n == SAMPLES else d),
            "no 'samples.safetensors' member",
        ),
        (lambda p, t: _rewrite(p, t, lambda n, d: None if n == MANIFEST else d), "no 'manifest"),
        (lambda p, t: _rewrite(p, t, _manifest_edit(_set_checksum)), "sha256 of 'model.ptl'"),
        (lambda p, t: _rewrite(p, t, _manifest_edit(_set_format)), "format 2; this fxcomp reads"),
        (lambda p, t: _rewrite(p, t, _manifest_edit(_set_bytecode)), "bytecode version 8, the"),
        (lambda p, t: _rewrite(p, t, lambda n, d: b"{" if n == MANIFEST else d), "not valid JSON"),
        (
            lambda p, t: _rewrite(
                p, t, lambda n, d: d[:100] + bytes([d[100] ^ 1]) + d[101:] if n == MODEL else d
            ),
            "sha256 of 'model.ptl'",
        ),
    ],
)
def test_a_damaged_bundle_is_refused_naming_what_is_wrong(digits_bundle, tmp_path, damage, message):
    _, _, result = digits_bundle
    damaged = damage(result.artifact.path, tmp_path / "damaged.fxbundle")
    with pytest.raises(BackendError, match=message):
        fxcomp.load_bundle(damaged)


def test_a_missing_file_is_a_backend_error(tmp_path):
    with pytest.raises(BackendError, match="no bundle at"):
        fxcomp.load_bundle(tmp_path / "none.fxbundle")


def test_cli_compiles_a_bundle_and_inspect_reruns_its_samples(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\n")
    compile_args = [
        "compile", "fxcomp.cli.digits:DigitsNet", "--input-shape", "1,1,8,8", "--calib", "digits",
        "--engine", "qnnpack", "--backend", "mobile", "--mean", "0", "--std", "1",
        "--labels", str(labels), "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    run = run_cli(*compile_args)
    assert run.returncode == 2, run.stderr
    assert "3 labels for an output of shape [1, 10]" in run.stderr
    assert not (tmp_path / "out" / FILENAME).exists()
    labels.write_text("\n".join(f"digit {i}" for i in range(10)))
    run = run_cli(*compile_args)
    assert run.returncode == 0, run.stderr
    assert "optimize_for_mobile skipped" in run.stdout
    bundle = tmp_path / "out" / FILENAME
    run = run_cli("inspect", str(bundle))
    assert run.returncode == 0, run.stderr
    assert re.search(r"engine +qnnpack", run.stdout)
    assert re.search(r"labels +10 \(digit 0, digit 1, digit 2, \.\.\.\)", run.stdout)
    assert re.search(r"inputs +input float32\[1, 1, 8, 8\] dynamic axes \[0\]", run.stdout)
    assert "samples: reproduced (max abs error 0," in run.stdout
    run = run_cli("inspect", str(bundle), "--json")
    assert json.loads(run.stdout[: run.stdout.rindex("}") + 1])["labels"][9] == "digit 9"
    _flip(bundle, bundle, bundle.stat().st_size // 2)
    run = run_cli("inspect", str(bundle))
    assert run.returncode == 2 and run.stderr.startswith("error: ")


def test_cli_refuses_a_kernel_engine_phones_do_not_run_before_any_work(tmp_path):
    run = run_cli(
        "compile", "torchvision:resnet18", "--engine", "x86", "--backend", "mobile",
        "-o", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 2
    assert "quantize with engine qnnpack for the mobile backend" in run.stderr
    run = run_cli("compile", "torchvision:resnet18", "--mean", "0.5", "-o", str(tmp_path))
    assert (
        run.returncode == 2
        and "apply to --backend mobile, executorch or openvino only" in run.stderr
    )


@pytest.mark.slow
def test_models_bundle_and_reproduce_in_a_fresh_process(digits_bundle, tmp_path):
    paths = [str(digits_bundle[2].artifact.path)]
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0"]:
        shape = (1, 3, 224, 224)
        crops = photo_crops(shape, 12)
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        model = reestimate_batchnorm(model, [crops[:4]])
        result = fxcomp.compile(
            model, crops[4:5], [fuse(), qnnpack([crops[4:8], crops[8:]])], "mobile", tmp_path / name
        )
        parity = result.artifact.parity
        # qnnpack's kernels add less noise to the reference graph than quantization added
        assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"], name
        assert result.artifact.manifest["inputs"][0]["dynamic_axes"] == [0], name
        paths.append(str(result.artifact.path))
    assert_reproduce_in_a_fresh_process(paths)


@pytest.mark.slow
def test_int8_mobilenet_v2_bundle_is_at_least_3_5x_smaller_than_the_float_ptl(tmp_path):
    shape = (1, 3, 224, 224)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    calibration = [photo_crops(shape, 4)]
    float_result = fxcomp.compile(model, noise, [fuse()], "mobile", tmp_path / "float")
    float_ptl = float_result.artifact.manifest["members"][MODEL]["bytes"]
    for sample, name in [(noise, "noise"), (photo_crops(shape, 1, seed=1), "photo")]:
        int8 = fxcomp.compile(
            model, sample, [fuse(), qnnpack(calibration)], "mobile", tmp_path / name
        )
        ratio = float_ptl / int8.artifact.path.stat().st_size
        assert ratio >= 3.5, (name, ratio)
