"""The fxcomp command line, run as a user would: in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxcomp.backends.bundle import load_bundle
from fxcomp.backends.onnx.check import check

EXAMPLE = Path(__file__).parent / "cli_models.py"


def fxcomp(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxcomp", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def resnet18_dumps() -> dict[str, subprocess.CompletedProcess]:
    return {
        fmt: fxcomp("dump", "torchvision:resnet18", "--passes", "fuse", "--format", fmt)
        for fmt in ("table", "code", "dot", "json")
    }


def test_table(resnet18_dumps):
    run = resnet18_dumps["table"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["name", "op", "target", "inputs", "shape", "dtype", "pass"]
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert "ConvReLU" in conv1 and "1x64x112x112" in conv1 and "float32" in conv1
    assert conv1.split()[-1] == "fuse"
    assert "fuse" in run.stderr and "modified" in run.stderr  # the per-pass report


def test_code(resnet18_dumps):
    run = resnet18_dumps["code"]
    assert run.returncode == 0, run.stderr
    assert "def forward(self, x" in run.stdout and "fxcomp_nn_fused_add_relu(" in run.stdout
    compile(run.stdout, "<dump>", "exec")


def test_dot(resnet18_dumps):
    run = resnet18_dumps["dot"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.lstrip().startswith("digraph")
    assert "conv1 -> maxpool" in run.stdout


def test_json(resnet18_dumps):
    run = resnet18_dumps["json"]
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["fc"]["shape"] == "1x1000" and nodes["fc"]["inputs"] == ["flatten"]
    assert nodes["add_relu"]["pass"] == "fuse"
    assert not [n for n in data["nodes"] if "BatchNorm" in n["target"]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:resnet1", "torchvision has no model named 'resnet1'"),
        ("resnet18", "model spec 'resnet18' is not SOURCE:NAME"),
        ("no_such_package_xyz:Model", "cannot import 'no_such_package_xyz'"),
        ("missing_file.py:Net", "no such file: missing_file.py"),
    ],
)
def test_bad_model_spec_is_one_line_and_exit_2(spec, message):
    run = fxcomp("dump", spec)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {message}")
    assert len(lines) <= 2 and all(line.startswith(("error:", "hint:")) for line in lines)
    assert "Traceback" not in run.stderr


def test_bad_shape_and_unknown_pass_exit_2():
    run = fxcomp("dump", "torchvision:resnet18", "--input-shape", "1,3,x")
    assert run.returncode == 2 and run.stderr.startswith("error: input shape '1,3,x'")
    run = fxcomp("dump", "torchvision:resnet18", "--passes", "fuse,quantise")
    assert run.returncode == 2 and "unknown pass 'quantise'" in run.stderr
    assert "built-in passes: fuse" in run.stderr


def test_untraceable_model_from_a_file_names_the_line_and_the_way_out(tmp_path):
    run = fxcomp("dump", f"{EXAMPLE}:Gated", "--input-shape", "1,3,8,8")
    assert run.returncode == 2
    assert "submodule 'gate' (Gate)" in run.stderr and "if x.sum() > 0:" in run.stderr
    assert "--leaf gate" in run.stderr
    run = fxcomp("dump", f"{EXAMPLE}:Gated", "--input-shape", "1,3,8,8", "--leaf", "gate")
    assert run.returncode == 0, run.stderr
    assert "gate (Gate)" in run.stdout


def test_debug_shows_the_traceback():
    run = fxcomp("--debug", "dump", "torchvision:resnet1")
    assert run.returncode == 2 and "Traceback" in run.stderr


def test_explain_shows_why_a_rule_did_not_apply():
    run = fxcomp(
        "dump", f"{EXAMPLE}:Tapped", "--input-shape", "1,3,8,8", "--passes", "fuse", "--explain"
    )
    assert run.returncode == 0, run.stderr
    assert "Why rules did not apply:" in run.stdout
    assert "fold_batchnorm not applied at 'bn'" in run.stdout
    assert "the output of 'conv' is also used by 'bn', 'relu'" in run.stdout


def test_after_each_writes_one_numbered_file_per_pass(tmp_path):
    out = tmp_path / "dumps"
    run = fxcomp(
        "dump",
        "torchvision:resnet18",
        "--passes",
        "fuse,cse,dce",
        "--format",
        "code",
        "--after-each",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00_trace.py", "01_fuse.py", "02_cse.py", "03_dce.py"]
    assert "bn1" in (out / "00_trace.py").read_text()
    assert "bn1" not in (out / "01_fuse.py").read_text()


def test_passes_lists_the_built_in_passes():
    run = fxcomp("passes")
    assert run.returncode == 0
    names = [line.split()[0] for line in run.stdout.splitlines()]
    assert names == [
        "fuse",
        "cse",
        "dce",
        "prune",
        "sparsify",
        "quantize",
        "quantize_dynamic",
        "quantize_weights",
        "unpack_attention",
        "equalize",
        "smooth_quant",
        "cast_weights",
        "share_weights",
    ]


@pytest.mark.parametrize(
    ("passes", "table"),
    [("fuse,equalize,quantize", "equalize"), ("quantize_dynamic", "quantize_dynamic")],
)
def test_compile_runs_the_range_and_dynamic_passes(tmp_path, passes, table):
    out = tmp_path / "out"
    run = fxcomp(
        "compile",
        "torchvision:resnet18",
        "--input-shape",
        "1,3,32,32",
        "--passes",
        passes,
        "--calib-batches",
        "1",
        "--latency-rounds",
        "2",
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert f"{table}, per layer:" in run.stdout and (out / "model.pt").exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["tables"][table] and set(saved["artifacts"][0]["latency_ms"]) == {
        "float",
        "torchscript",
    }


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "fxcomp"
    run = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "dump" in run.stdout


def test_compile_quantizes_to_torchscript_and_prints_a_summary(tmp_path):
    out = tmp_path / "out"
    run = fxcomp(
        "compile",
        "torchvision:resnet18",
        "--passes",
        "fuse,quantize",
        "--calib",
        "random",
        "--calib-batches",
        "2",
        "--engine",
        "x86",
        "--backend",
        "torchscript",
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "model.pt",
        "report.html",
        "report.json",
        "size_latency.png",
    ]
    artifact = next(line for line in run.stdout.splitlines() if line.startswith("artifact"))
    assert artifact.split()[-1] == str(out / "model.pt")
    assert "deprecated" not in run.stderr
    size = next(line for line in run.stdout.splitlines() if line.startswith("size "))
    assert float(size.split("(")[1].rstrip("x)")) >= 3.9
    assert "sqnr_db_vs_float" in run.stdout and "quantize" in run.stdout


@pytest.mark.parametrize("engine", ["tensorrt", "ort"])
def test_compile_to_onnx_checks_the_rules_and_prints_a_trtexec_line(tmp_path, engine):
    out = tmp_path / "out"
    run = fxcomp(
        "compile",
        "torchvision:resnet18",
        "--input-shape",
        "2,3,32,32",
        "--passes",
        "fuse,quantize",
        "--bias-correction",
        "--calib-batches",
        "1",
        "--engine",
        engine,
        "--backend",
        "onnx",
        "--latency-rounds",
        "0",
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    path = out / "model.onnx"
    assert check(path, engine).ok
    assert "correct_bias, per layer:" in run.stdout
    trtexec = next(line for line in run.stdout.splitlines() if line.startswith("trtexec"))
    if engine == "tensorrt":
        shapes = "--minShapes=input:1x3x32x32 --optShapes=input:2x3x32x32"
        assert f"trtexec --onnx={path} --int8 --fp16 {shapes}" in trtexec
        assert trtexec.endswith("--maxShapes=input:32x3x32x32")
    else:
        assert "none: ort's uint8 Q/DQ is for ONNX Runtime" in trtexec


def test_compile_learns_the_rounding_when_asked(tmp_path):
    out = tmp_path / "out"
    args = ["compile", f"{EXAMPLE}:Tapped", "--input-shape", "1,3,8,8", "--passes"]
    args += ["fuse,quantize", "--rounding", "learned", "--calib-batches", "1"]
    run = fxcomp(*args, "--latency-rounds", "0", "-o", str(out))
    assert run.returncode == 0, run.stderr
    table = run.stdout.split("learn_rounding, per layer:")[1]
    assert "output_error" in table and "rounding" in table
    bad = fxcomp(*args[:-4], "--rounding", "stochastic", "-o", str(out))
    assert bad.returncode != 0 and "'stochastic' is not one of 'nearest', 'learned'" in bad.stderr


def test_compile_prunes_with_options_and_draws_the_importance(tmp_path):
    out = tmp_path / "out"
    run = fxcomp(
        "compile",
        "torchvision:resnet18",
        "--passes",
        "prune,fuse",
        "--ratio",
        "0.5",
        "--scope",
        "global",
        "--ignore",
        "layer4.*",
        "--round-to",
        "8",
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "model.pt",
        "prune_importance.png",
        "report.html",
        "report.json",
        "size_latency.png",
    ]
    assert f"prune_importance: {out / 'prune_importance.png'}" in run.stdout
    table = run.stdout.split("prune, per layer:")[1]
    conv1 = next(line for line in table.splitlines() if line.startswith("conv1 "))
    assert "3 -> 3" in conv1 and "64 -> " in conv1 and int(conv1.split("64 -> ")[1][:2]) % 8 == 0
    layer4 = next(line for line in table.splitlines() if line.startswith("layer4.0.conv1 "))
    assert "512 -> 512" in layer4 and "kept: ignored" in layer4


def test_compile_with_image_folder_and_bad_calibration(tmp_path):
    import torch
    from torchvision.io import write_png

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        write_png(torch.randint(0, 255, (3, 40, 30), dtype=torch.uint8), str(images / f"{i}.png"))
    run = fxcomp(
        "compile",
        f"{EXAMPLE}:Tapped",
        "--input-shape",
        "1,3,8,8",
        "--calib",
        f"folder:{images}",
        "-o",
        str(tmp_path / "out"),
    )
    assert run.returncode == 0, run.stderr
    run = fxcomp("compile", "torchvision:resnet18", "--calib", "digits", "-o", str(tmp_path / "x"))
    assert run.returncode == 2 and "--calib digits gives (N, 1, 8, 8) images" in run.stderr
    assert not (tmp_path / "x").exists()


def _demo_table(stdout: str) -> dict[str, list]:
    """The demo's rows by step: accuracy, parameters, size KiB, batch-1 ms, test-set ms."""
    lines = stdout.splitlines()
    rows = {}
    for line in lines[2 : lines.index("")]:
        *words, acc, params, kib, ms1, ms_all = line.split()
        rows[" ".join(words)] = [float(acc), int(params), float(kib), float(ms1), float(ms_all)]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--qat", "2"]], ids=["ptq", "qat"])
def test_demo_is_the_main_job(tmp_path, options):
    run = fxcomp("demo", "-o", str(tmp_path / "demo"), *options)
    assert run.returncode == 0, run.stderr
    rows = _demo_table(run.stdout)
    int8 = "INT8 x86 (QAT, 2 epochs)" if options else "INT8 x86 (mse PTQ)"
    assert list(rows) == ["float", "pruned 50%", "distilled (6 epochs)", int8]
    floating, pruned, distilled, quantized = rows.values()
    assert floating[0] > 97
    assert pruned[0] < floating[0] - 20  # pruning alone costs accuracy...
    assert distilled[0] >= floating[0] - 1.0  # ...that distillation wins back
    assert quantized[0] >= distilled[0] - 0.5
    assert pruned[1] == distilled[1] == quantized[1] < 0.3 * floating[1]
    assert distilled[2] < 0.35 * floating[2] and quantized[2] < 0.6 * distilled[2]  # KiB
    assert (tmp_path / "demo" / "model.pt").exists()


def test_analyze_ranks_layers_and_writes_json_and_a_picture(tmp_path):
    run = fxcomp(
        "analyze",
        "torchvision:resnet18",
        "--input-shape",
        "1,3,64,64",
        "--calib-batches",
        "2",
        "-o",
        str(tmp_path / "a"),
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("model SQNR") and "SQNR alone dB" in lines[1]
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    names = [layer["name"] for layer in saved["layers"]]
    assert len(names) == 21 and "fc" in names and "conv1" in names  # 20 convs and the fc
    assert lines[3].split()[0] == names[0]
    alone = [layer["sqnr_alone"] for layer in saved["layers"]]
    assert alone == sorted(alone)
    assert (tmp_path / "a" / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dump_takes_a_hugging_face_model_with_its_own_inputs():
    out = fxcomp("dump", "transformers:bert", "--format", "table")
    assert out.returncode == 0, out.stderr
    assert "encoder.layer.1.attention.self.query" in out.stdout  # lifted, named as in the model
    out = fxcomp("dump", "transformers:bert", "--input-shape", "1,3")
    assert out.returncode == 2 and "drop --input-shape" in out.stderr


def test_compile_quantizes_a_language_model_weight_only_on_standard_library_text(tmp_path):
    out = fxcomp(
        *("compile", "transformers:llama", "--input-shape", "1,16", "--calib", "stdlib"),
        *("--calib-batches", "2", "--passes", "quantize_weights", "--bits", "4"),
        *("--group-size", "32", "--method", "gptq", "--latency-rounds", "0", "-o", str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("gptq      4       32") == 14  # every Linear but the head
    assert (tmp_path / "model.pt").is_file()


def test_compile_writes_symmetric_int4_weights_into_an_executorch_bundle(tmp_path):
    out = fxcomp(
        *("compile", "transformers:llama", "--input-shape", "1,16", "--calib", "stdlib"),
        *("--calib-batches", "1", "--passes", "quantize_weights", "--bits", "4"),
        *("--group-size", "32", "--symmetric", "--backend", "executorch"),
        *("--max-length", "64", "--latency-rounds", "0", "-o", str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("rtn       4       32") == 14  # every Linear but the head
    assert re.search(r"sqnr_db_vs_reference +4\d\.\d", out.stdout)  # the .pte, 44-45 dB
    manifest = load_bundle(tmp_path / "model.fxbundle").manifest
    assert manifest["max_length"] == 64 and manifest["inputs"][0]["dynamic_axes"] == [0, 1]


def test_executorch_bounds_apply_to_that_backend_only(tmp_path):
    out = fxcomp(
        *("compile", "transformers:bert", "--input-shape", "1,16", "--calib", "stdlib"),
        *("--passes", "fuse", "--backend", "onnx", "--max-length", "64", "-o", str(tmp_path)),
    )
    assert out.returncode != 0
    assert "--max-length apply to --backend executorch only" in out.stderr
