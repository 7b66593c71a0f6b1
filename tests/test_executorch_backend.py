"""The ExecuTorch backend: XNNPACK-delegated ``.pte`` bundles from float graphs and from
``quantize(engine="xnnpack")`` reference graphs, verified in ExecuTorch's runtime.

Tolerances: a float program reproduces the compiled graph within 1e-5 relative (XNNPACK's
float kernels add in another order); an INT8 program is within the reference graph's own
quantization noise of it (``checked_parity``; XNNPACK rounds ``x * (1 / scale)`` where the
reference rounds ``x / scale``, and a value on a rounding edge moves one step), and each
bundle reproduces its samples within the manifest's ``atol``. The digits program's test
accuracy equals the INT8 reference graph's within 0.2 points.
"""

from __future__ import annotations

import hashlib
import re
import zipfile

import pytest
import torch
import torchvision
from fresh_bundles import assert_reproduce_in_a_fresh_process, rewrite_bundle, run_cli
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS, check_request
from fxcomp.backends.bundle import EXECUTORCH, MANIFEST, PROGRAMS, SAMPLES, output_leaves
from fxcomp.backends.bundle_manifest import FILENAME
from fxcomp.cli.calibration_data import photo_crops
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.cli.zoo import transformer
from fxcomp.ir.errors import BackendError, InputError
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.nn.weight_only import WeightOnlyLinear
from fxcomp.passes import (
    distill,
    fuse,
    prune,
    qat,
    quantize,
    quantize_dynamic,
    quantize_weights,
    smooth_quant,
)
from fxcomp.quant.config import QuantConfig
from fxcomp.quant.dynamic import DynamicLinear
from fxcomp.quant.pipeline import calibrate, observe
from fxcomp.runtime.parity import sqnr

(PTE,) = PROGRAMS[EXECUTORCH]
QUANTIZED_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel")


def xnnpack(data, **options):
    return quantize(data, engine="xnnpack", progress=False, **options)


def _in_batches(bundle):
    """The bundle run on any number of rows, eight at a time (its ``max_batch``)."""
    return lambda x: torch.cat([bundle(rows) for rows in x.split(8)])


def _portable_ops(manifest) -> set[str]:
    return {entry["op"] for entry in manifest["delegation"]["portable"]}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=False)
    result = fxcomp.compile(
        model,
        data.test_x[:1],
        [fuse(), xnnpack([x for x, _ in data.batches()])],
        backend="executorch",
        output_dir=tmp_path_factory.mktemp("digits"),
        backend_options={"labels": [str(d) for d in range(10)], "mean": [0.0], "std": [1.0]},
    )
    return data, model, result


def test_digits_pte_keeps_int8_accuracy_and_describes_itself(digits):
    data, model, result = digits
    bundle = fxcomp.load_bundle(result.artifact.path)
    reference = accuracy(result.module, data.test_x, data.test_y)
    assert accuracy(model, data.test_x, data.test_y) > 95
    assert abs(accuracy(_in_batches(bundle), data.test_x, data.test_y) - reference) <= 0.2
    with pytest.raises(InputError, match="batches of up to 8 rows, got 9"):
        bundle(data.test_x[:9])
    manifest = bundle.manifest
    assert manifest["runtime"] == "executorch" and manifest["engine"] == "xnnpack"
    assert manifest["versions"]["executorch"] == "1.5.1"
    assert manifest["inputs"][0]["dynamic_axes"] == [0] and manifest["max_batch"] == 8
    assert manifest["labels"][3] == "3" and manifest["preprocessing"]["mean"] == [0.0]
    layers = manifest["layers"]
    assert [layer["precision"] for layer in layers] == ["int8"] * len(layers)
    assert layers[0]["weight"]["qscheme"] == "per_channel_symmetric"
    assert layers[0]["output"]["dtype"] == "qint8"
    # every convolution, linear and Q/DQ step runs inside XNNPACK
    delegated = manifest["delegation"]["xnnpack"]
    assert delegated["aten.convolution.default"] == 3 and delegated["aten.linear.default"] == 1
    assert not _portable_ops(manifest) & {"aten.convolution.default", *QUANTIZED_OPS}
    with zipfile.ZipFile(result.artifact.path) as archive:
        assert sorted(archive.namelist()) == sorted([MANIFEST, PTE, SAMPLES])
        digest = hashlib.sha256(archive.read(PTE)).hexdigest()
    assert manifest["members"][PTE]["sha256"] == digest
    assert bundle.verify() == [0.0]


def test_float_program_reproduces_the_graph_at_other_batch_sizes(residual_net, image, tmp_path):
    result = fxcomp.compile(residual_net, image, [fuse()], "executorch", tmp_path)
    bundle = BACKENDS["executorch"].load(result.artifact)
    assert bundle.manifest["engine"] is None
    assert {layer["precision"] for layer in bundle.manifest["layers"]} == {"float"}
    assert result.artifact.parity["sqnr_db_vs_reference"] > 80
    for rows in (1, 2, 5, 8):
        x = torch.randn(rows, 3, 16, 16)
        torch.testing.assert_close(bundle(x), result.module(x), rtol=1e-5, atol=1e-5)
    assert "aten.convolution.default" in bundle.manifest["delegation"]["xnnpack"]


def test_a_batch_bound_the_lowering_narrows_is_recorded(residual_net, image, tmp_path):
    options = {"max_batch": 32}
    result = fxcomp.compile(
        residual_net, image, [fuse()], "executorch", tmp_path, backend_options=options
    )
    manifest = result.artifact.manifest
    # XNNPACK's lowering of convolutions narrows the batch axis to 15 rows in ExecuTorch 1.5
    assert manifest["max_batch"] == 15
    assert "planned memory for batches of up to 15 rows, not the 32" in manifest["notes"][0]
    bundle = fxcomp.load_bundle(result.artifact.path)
    assert bundle(torch.randn(15, 3, 16, 16)).shape == (15, 3)
    with pytest.raises(InputError, match="batches of up to 15 rows, got 16"):
        bundle(torch.randn(16, 3, 16, 16))


def test_an_example_filling_max_batch_keeps_the_batch_dynamic(residual_net, image, tmp_path):
    """The example's 2 rows are the bound: the check runs one row fewer, not one more."""
    options = {"max_batch": 2}
    result = fxcomp.compile(
        residual_net, image, [fuse()], "executorch", tmp_path, backend_options=options
    )
    manifest = result.artifact.manifest
    assert manifest["max_batch"] == 2 and manifest["inputs"][0]["dynamic_axes"] == [0]
    assert not manifest["notes"]
    bundle = fxcomp.load_bundle(result.artifact.path)
    torch.testing.assert_close(bundle(image[:1]), result.module(image[:1]), rtol=1e-5, atol=1e-5)


def test_int8_residual_net_runs_every_quantized_op_in_xnnpack(residual_net, image, tmp_path):
    data = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    result = fxcomp.compile(residual_net, image, [fuse(), xnnpack(data)], "executorch", tmp_path)
    manifest, parity = result.artifact.manifest, result.artifact.parity
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3
    delegated = manifest["delegation"]["xnnpack"]
    assert delegated["aten.convolution.default"] == 2 and delegated["aten.add.Tensor"] == 1
    assert not _portable_ops(manifest) & {
        "aten.convolution.default",
        "aten.addmm.default",
        "aten.add.Tensor",
        *QUANTIZED_OPS,
    }
    assert manifest["notes"] == []


def test_skipped_layers_stay_float_and_are_recorded(residual_net, image, tmp_path):
    passes = [fuse(), xnnpack([image], skip=["out"])]
    result = fxcomp.compile(residual_net, image, passes, "executorch", tmp_path)
    precision = {layer["name"]: layer["precision"] for layer in result.artifact.manifest["layers"]}
    assert precision["out"] == "float" and precision["stem"] == "int8"
    bundle = fxcomp.load_bundle(result.artifact.path)
    torch.testing.assert_close(
        bundle(image), result.module(image), atol=bundle.manifest["samples"]["atol"], rtol=0
    )


class Cumulative(nn.Module):
    """A convolution, then an op XNNPACK does not take (cumsum) before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)).cumsum(1))


def test_an_op_xnnpack_does_not_take_runs_on_portable_kernels_and_is_named(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    result = fxcomp.compile(Cumulative().eval(), x, [], "executorch", tmp_path)
    manifest = result.artifact.manifest
    assert "aten.cumsum.default" in _portable_ops(manifest)
    assert "aten.convolution.default" in manifest["delegation"]["xnnpack"]
    assert manifest["notes"] == []  # cumsum is not the model's compute
    torch.testing.assert_close(fxcomp.load_bundle(result.artifact.path)(x), result.module(x))


class ComputedWeight(nn.Module):
    """A convolution whose weight is computed at run time: XNNPACK takes constant weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight.tanh())


def test_a_convolution_left_on_portable_kernels_is_named_a_performance_bug(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    result = fxcomp.compile(ComputedWeight().eval(), x, [], "executorch", tmp_path)
    notes = result.artifact.manifest["notes"]
    assert any(
        re.search(r"aten.convolution.default \w+ .*portable kernels, not XNNPACK", n) for n in notes
    ), notes


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        (
            lambda x: [fuse(), quantize([x], engine="x86", progress=False)],
            "does not take graphs quantized for 'x86'",
        ),
        (
            lambda x: [fuse(), quantize([x], engine="tensorrt", progress=False)],
            "does not take graphs quantized for 'tensorrt'",
        ),
    ],
)
def test_graphs_for_other_engines_are_refused_before_any_work(
    residual_net, image, tmp_path, passes, message
):
    with pytest.raises(BackendError, match=message):
        fxcomp.compile(residual_net, image, passes(image), "executorch", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prune_smoothquant_bias_correction_and_qat_reach_the_pte(digits, tmp_path):
    """The other passes' work is in the reference graph, so it is in the program too: each
    program's accuracy is its reference graph's within 0.5 points."""
    data, model, _ = digits
    batches = data.batches()
    x = data.test_x[:1]
    calibration = [images for images, _ in batches]
    pipelines = {
        "prune+distill+bias_correction": [
            prune(0.5),
            distill(model, data.batches(32), progress=False),
            fuse(),
            xnnpack(calibration, bias_correction=True),
        ],
        "smooth_quant": [fuse(), smooth_quant(calibration), xnnpack(calibration)],
        "qat": [fuse(), qat(batches, epochs=1, engine="xnnpack", progress=False)],
    }
    for name, passes in pipelines.items():
        result = fxcomp.compile(model, x, passes, "executorch", tmp_path / name)
        bundle = fxcomp.load_bundle(result.artifact.path)
        assert bundle.manifest["engine"] == "xnnpack", name
        reference = accuracy(result.module, data.test_x, data.test_y)
        assert abs(accuracy(_in_batches(bundle), data.test_x, data.test_y) - reference) <= 0.5, name
        assert reference > 90, name
    conv = {layer["name"]: layer for layer in bundle.manifest["layers"]}["stem.0"]
    assert conv["precision"] == "int8"


def test_a_graph_still_observing_is_refused(residual_net, image, tmp_path):
    passes = [fuse(), observe(QuantConfig("xnnpack")), calibrate([image])]
    gm = fxcomp.compile(residual_net, image, passes).module
    with pytest.raises(BackendError, match="calibrated but not frozen"):
        BACKENDS["executorch"].emit(gm, fxcomp.CompileContext.from_inputs((image,)), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("engine", "message"),
    [("x86", "lowered to x86 kernels"), ("tensorrt", "quantized for 'tensorrt'")],
)
def test_a_foreign_graph_that_reaches_the_backend_is_refused_without_a_file(
    residual_net, image, tmp_path, engine, message
):
    gm = fxcomp.compile(residual_net, image, [fuse(), quantize([image], engine=engine)]).module
    ctx = fxcomp.CompileContext.from_inputs((image,))
    with pytest.raises(BackendError, match=message):
        BACKENDS["executorch"].emit(gm, ctx, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_executorch_the_backend_says_how_to_get_it(without_module):
    without_module("executorch")
    with pytest.raises(BackendError, match="needs ExecuTorch") as err:
        check_request("executorch", [fuse()])
    assert "pip install 'fxcomp[executorch]'" in str(err.value)


def _garble_program(manifest, members):
    """A damaged program whose checksum was made to match: the runtime must refuse it."""
    program = bytearray(members[PTE])
    program[8:64] = bytes(56)
    members[PTE] = bytes(program)
    manifest["members"][PTE]["sha256"] = hashlib.sha256(program).hexdigest()


def _flip_program(manifest, members):
    program = bytearray(members[PTE])
    program[len(program) // 2] ^= 1
    members[PTE] = bytes(program)


def _unknown_runtime(manifest, members):
    manifest["runtime"] = "tflite"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_flip_program, "sha256 of 'model.pte'"),
        (_garble_program, "ExecuTorch's runtime cannot load"),
        (_unknown_runtime, "for the runtime 'tflite'"),
    ],
)
def test_a_damaged_bundle_is_refused_naming_what_is_wrong(digits, tmp_path, change, message):
    damaged = rewrite_bundle(digits[2].artifact.path, tmp_path / "damaged.fxbundle", change)
    with pytest.raises(BackendError, match=message):
        fxcomp.load_bundle(damaged)


def test_cli_compiles_a_pte_bundle_and_inspect_reruns_its_samples(tmp_path):
    run = run_cli(
        "compile", "fxcomp.cli.digits:DigitsNet", "--input-shape", "1,1,8,8", "--calib",
        "digits", "--engine", "xnnpack", "--backend", "executorch", "--latency-rounds", "0",
        "-o", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    run = run_cli("inspect", str(tmp_path / FILENAME))
    assert run.returncode == 0, run.stderr
    assert re.search(r"runtime +executorch", run.stdout)
    assert re.search(r"engine +xnnpack", run.stdout)
    assert re.search(r"xnnpack +\d+ ops \(.*aten.convolution.default", run.stdout)
    assert "samples: reproduced (max abs error 0," in run.stdout


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_transformer_dynamic_linears_run_in_xnnpack(name, tmp_path):
    """quantize_dynamic(engine="xnnpack"): every Linear becomes XNNPACK's dynamically
    quantized linear (its input quantized per call) inside the delegate."""
    model, inputs = transformer(name)
    passes = [quantize_dynamic(engine="xnnpack")]
    result = fxcomp.compile(model, inputs, passes, "executorch", tmp_path)
    manifest, parity = result.artifact.manifest, result.artifact.parity
    linears = sum(isinstance(m, DynamicLinear) for m in result.module.modules())
    delegated = manifest["delegation"]["xnnpack"]
    assert linears >= 9 and delegated["aten.linear.default"] == linears
    assert delegated["quantized_decomposed.choose_qparams.tensor"] == linears
    assert "aten.linear.default" not in _portable_ops(manifest)
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3
    assert parity["sqnr_db_vs_float"] > 35
    bundle = fxcomp.load_bundle(result.artifact.path)
    assert bundle.verify()[0] <= bundle.manifest["samples"]["atol"]
    if name == "gpt2":  # ExecuTorch's view pass refuses its dynamic batch: fixed, and said so
        assert manifest["inputs"][0]["dynamic_axes"] == []
        assert "batch axis fixed at 2" in manifest["notes"][0]


def test_token_inputs_take_any_length_up_to_max_length(tmp_path):
    """backend_options={"max_length": N}: the token inputs' sequence axis is dynamic up to N
    tokens, verified at 1 and N tokens against the compiled graph, and recorded."""
    model, inputs = transformer("bert")
    passes = [quantize_dynamic(engine="xnnpack")]
    options = {"max_length": 40}
    result = fxcomp.compile(model, inputs, passes, "executorch", tmp_path, backend_options=options)
    manifest, parity = result.artifact.manifest, result.artifact.parity
    assert manifest["max_length"] == 40 and manifest["max_batch"] == 8
    assert [i["dynamic_axes"] for i in manifest["inputs"]] == [[0, 1], [0, 1]]
    # the hidden states follow the sequence; the pooled output does not
    assert [o["dynamic_axes"] for o in manifest["outputs"]] == [[0, 1], [0]]
    bundle = fxcomp.load_bundle(result.artifact.path)
    gen = torch.Generator().manual_seed(1)
    for rows, length in ((3, 5), (1, 40), (8, 23)):
        ids = torch.randint(0, 100, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        got = output_leaves(bundle(ids, mask))
        with torch.no_grad():
            expected = output_leaves(result.module(ids, mask))
        assert got[0].shape == (rows, length, 64)
        assert sqnr(expected, got) >= parity["sqnr_db_vs_reference"] - 3
    with pytest.raises(InputError, match="sequences of up to 40 tokens, got 41"):
        bundle(torch.zeros(1, 41, dtype=torch.long), torch.ones(1, 41, dtype=torch.long))


def test_max_length_is_refused_where_it_cannot_apply(residual_net, image, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"token inputs .* the model's inputs are float32\["):
        fxcomp.compile(
            residual_net, image, [], "executorch", out, backend_options={"max_length": 16}
        )
    model, inputs = transformer("bert")
    with pytest.raises(InputError, match="max_length 8 is shorter than the example inputs' 12"):
        fxcomp.compile(model, inputs, [], "executorch", out, backend_options={"max_length": 8})
    model, inputs = transformer("gpt2")  # 64 positions
    with pytest.raises(InputError, match="the compiled graph does not run on 100 tokens"):
        fxcomp.compile(model, inputs, [], "executorch", out, backend_options={"max_length": 100})
    with pytest.raises(InputError, match="max_length must be a positive integer, got 0"):
        check_request("executorch", [], {"max_length": 0})
    assert not out.exists() or not any(out.iterdir())


def _llama():
    model, inputs = transformer("llama")
    return model, {"input_ids": inputs["input_ids"], "use_cache": False}


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_linears_run_in_xnnpack(bits, tmp_path):
    """quantize_weights(symmetric=True): every Linear becomes XNNPACK's dynamically quantized
    linear, with int8 weights per channel or int4 weights in groups of 32."""
    model, inputs = _llama()
    passes = [quantize_weights(bits=bits, group_size=32, symmetric=True, progress=False)]
    result = fxcomp.compile(model, inputs, passes, "executorch", tmp_path)
    manifest, parity = result.artifact.manifest, result.artifact.parity
    linears = sum(isinstance(m, WeightOnlyLinear) for m in result.module.modules())
    delegated = manifest["delegation"]["xnnpack"]
    assert linears >= 7 and delegated["aten.linear.default"] == linears + 1  # and the head
    assert "aten.linear.default" not in _portable_ops(manifest)
    assert delegated["quantized_decomposed.choose_qparams_per_token_asymmetric.default"] == linears
    if bits == 4:
        assert delegated["quantized_decomposed.dequantize_per_channel_group.default"] == linears
    # the program also quantizes each Linear's input to int8 per row: 44-45 dB from the
    # reference graph here, far within the margin
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] - 3
    assert parity["sqnr_db_vs_float"] > (30 if bits == 8 else 15)
    bundle = fxcomp.load_bundle(result.artifact.path)
    assert bundle.verify()[0] <= bundle.manifest["samples"]["atol"]


def test_asymmetric_int4_is_refused_naming_the_option(tmp_path):
    model, inputs = _llama()
    passes = [quantize_weights(bits=4, group_size=32, progress=False)]
    with pytest.raises(BackendError, match=r"bits=4\) without symmetric=True makes asymmetric"):
        fxcomp.compile(model, inputs, passes, "executorch", tmp_path / "out")  # before the pass
    inside = [fxcomp.Pipeline("compress", passes)]  # a pipeline's passes are checked too
    with pytest.raises(BackendError, match=r"bits=4\) without symmetric=True makes asymmetric"):
        fxcomp.compile(model, inputs, inside, "executorch", tmp_path / "out")
    own = [fxcomp.Pass("my_int4", passes[0].run)]  # a pass of the user's own: seen at the end
    with pytest.raises(BackendError, match=r"'model.layers.0.self_attn.q_proj' holds asymmetric"):
        fxcomp.compile(model, inputs, own, "executorch", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_torchvision_programs_match_their_reference_and_reload_in_a_fresh_process(tmp_path):
    paths = []
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_large"]:
        crops = photo_crops((1, 3, 224, 224), 12)
        torch.manual_seed(0)
        model = reestimate_batchnorm(torchvision.models.get_model(name, weights=None), [crops[:4]])
        passes = [fuse(), xnnpack([crops[4:8], crops[8:]])]
        result = fxcomp.compile(model, crops[4:5], passes, "executorch", tmp_path / name)
        parity, manifest = result.artifact.parity, result.artifact.manifest
        assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"], name
        assert not _portable_ops(manifest) & {"aten.convolution.default", *QUANTIZED_OPS}, name
        assert manifest["notes"] == [], name
        paths.append(str(result.artifact.path))
    assert_reproduce_in_a_fresh_process(paths)
