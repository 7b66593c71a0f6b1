"""INT8 in OpenVINO: fxcomp's IR against NNCF's ``nncf.quantize`` flow, and against the other
INT8 artifacts of the same model (fxcomp's TorchScript, ONNX Runtime's ``quantize_static``).

    python examples/bench_openvino.py
    python examples/bench_openvino.py --model resnet18 --batch 1 --repeats 40 --json ov.json

Artifacts per torchvision model, all made from the same random-weight float model
(``weights=None``; BatchNorm statistics first re-estimated on the input distribution, as
``examples/bench_onnx.py`` does):

* OpenVINO float: ``fxcomp.compile(model, x, [fuse()], backend="openvino")`` in f32, and the
  same IR compiled with OpenVINO's bf16 inference precision (its default on AMX CPUs);
* fxcomp OpenVINO: ``fxcomp.compile(model, x, [fuse(), quantize(calib, engine="openvino")],
  backend="openvino")``: uint8 affine activations, int8 symmetric per-channel weights,
  fxcomp's default MSE observer;
* NNCF: the peer that targets this runtime, as its documentation gives it:
  ``ov.convert_model(model, example_input=x)``, ``nncf.quantize`` with its defaults
  (performance preset) on the same calibration images, one per item (``subset_size`` all of
  them);
* fxcomp TorchScript: ``quantize(calib, engine="x86")``, ``backend="torchscript"`` (oneDNN
  and fbgemm kernels);
* quantize_static: ONNX Runtime's ``quantize_static`` of fxcomp's float ONNX file in its
  fastest configuration here (``bench_onnx.quantize_static_file``), and fxcomp's own
  ``engine="ort"`` file, both run in ONNX Runtime.

Both OpenVINO quantizers and ONNX Runtime's calibrate on ``--calib-batches`` batches of 8
normal-noise images (seed ``--seed``); two further batches of 8 are held out.

Latency of one call in ms at each ``--batch``: every runtime is timed in a process of its
own, with nothing else running (``--time RUNTIME``): OpenVINO's threads, ONNX Runtime's and
PyTorch's OpenMP threads must never share a timing. Within a process the artifacts are
warmed up ``--warmup`` times, then timed interleaved for ``--repeats`` rounds by
``fxcomp.runtime.latency.median_latency``, every order in turn, with an A/A line (one
artifact under two names: the noise floor). The OpenVINO IRs are reshaped to the static
batch being timed and compiled with ``INFERENCE_NUM_THREADS`` = the cores and the latency
hint. Ratios within a runtime come from one process; ratios across runtimes (``/ TorchScript``,
``/ quantize_static``) compare medians of separate processes run one after the other.

SQNR in dB of each INT8 artifact's output against the float model's on the 16 held-out
images. The digits CNN (trained on scikit-learn's digits in seconds) gives accuracy: the
float model, fxcomp's INT8 reference graph, its OpenVINO IR, and NNCF's.
``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision
from bench_onnx import quantize_static_file
from benchmarks_doc import add_output_options, output
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.backends.onnx import backend as onnx_model
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.passes import fuse, quantize
from fxcomp.runtime.latency import median_latency
from fxcomp.runtime.parity import sqnr

OPENVINO_KINDS = ("float f32", "float bf16", "nncf", "fxcomp")
ORT_KINDS = ("quantize_static", "fxcomp ort")
TORCH_KINDS = ("float eager", "fxcomp torchscript")
INT8 = ("fxcomp", "nncf", "fxcomp torchscript", "quantize_static", "fxcomp ort")


def prepared_model(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.get_model(name, weights=None), data).eval()


def nncf_ir(model: nn.Module, calibration: list[torch.Tensor], path: Path) -> Path:
    """The peer: NNCF's post-training quantization of the OpenVINO model, saved as IR."""
    import nncf
    import openvino as ov

    x = calibration[0][:1]
    images = [image[None].numpy() for batch in calibration for image in batch]
    quantized = nncf.quantize(
        ov.convert_model(model, example_input=x), nncf.Dataset(images), subset_size=len(images)
    )
    ov.save_model(quantized, path, compress_to_fp16=False)
    return path


def _unzipped_ir(bundle: Path, out: Path) -> Path:
    """The IR inside an openvino bundle, as ``out/model.xml`` and ``out/model.bin``."""
    import zipfile

    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(out, members=["model.xml", "model.bin"])
    return out / "model.xml"


def make_artifacts(model: nn.Module, calibration: list[torch.Tensor], out: Path) -> dict:
    """Every artifact's path (IRs as ``.xml``), by kind."""
    x = calibration[0][:1]
    ov_int8 = [fuse(), quantize(calibration, engine="openvino", progress=False)]
    made = {}
    for key, passes in (("float f32", [fuse()]), ("fxcomp", ov_int8)):
        artifact = fxcomp.compile(model, x, passes, "openvino", out / key).artifact
        made[key] = _unzipped_ir(artifact.path, out / key / "ir")
    made["float bf16"] = made["float f32"]
    made["nncf"] = nncf_ir(model, calibration, out / "nncf" / "model.xml")
    float_onnx = fxcomp.compile(model, x, [fuse()], "onnx", out / "onnx").artifact.path
    made["quantize_static"] = quantize_static_file(float_onnx, calibration, out / "onnx")
    ort_int8 = [fuse(), quantize(calibration, engine="ort", progress=False)]
    made["fxcomp ort"] = fxcomp.compile(model, x, ort_int8, "onnx", out / "ort").artifact.path
    x86 = [fuse(), quantize(calibration, engine="x86", progress=False)]
    made["fxcomp torchscript"] = fxcomp.compile(
        model, x, x86, "torchscript", out / "ts"
    ).artifact.path
    made["float eager"] = out / "float_eager.pt"
    torch.save(model.state_dict(), made["float eager"])
    return {key: str(path) for key, path in made.items()}


def _openvino_runs(files: dict, batch: int) -> dict:
    import openvino as ov

    core = ov.Core()
    runs = {}
    for key in OPENVINO_KINDS:
        ir = core.read_model(files[key])
        ir.reshape([batch, 3, 224, 224])
        precision = "bf16" if key == "float bf16" else "f32"
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        config["INFERENCE_NUM_THREADS"] = torch.get_num_threads()
        request = core.compile_model(ir, "CPU", config).create_infer_request()
        runs[key] = lambda x, request=request: request.infer([x.numpy()])
    return runs


def _ort_runs(files: dict) -> dict:
    sessions = {key: onnx_model.session(files[key]) for key in ORT_KINDS}
    return {key: lambda x, s=s: onnx_model.run(s, (x,)) for key, s in sessions.items()}


def _torch_runs(files: dict, name: str, batch: int) -> dict:
    model = torchvision.models.get_model(name, weights=None).eval()
    model.load_state_dict(torch.load(files["float eager"], weights_only=True))
    shapes = [[batch, 3, 224, 224]]
    int8 = BACKENDS["torchscript"].load(files["fxcomp torchscript"], input_shapes=shapes)
    return {"float eager": model, "fxcomp torchscript": int8}


def time_runtime(runtime: str, files: dict, name: str, batches: list[int], args) -> dict:
    """Median ms of each artifact of one runtime at each batch size (this process alone)."""
    found = {}
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        if runtime == "openvino":
            runs = _openvino_runs(files, batch)
        elif runtime == "onnxruntime":
            runs = _ort_runs(files)
        else:
            runs = _torch_runs(files, name, batch)
        with torch.no_grad():
            for run in runs.values():
                for _ in range(args.warmup):
                    run(x)
        first = next(iter(runs))
        runs[f"{first} (A/A)"] = runs[first]
        ms = median_latency(runs, [(x,)], args.repeats)
        found[batch] = {key: values[0] for key, values in ms.items()}
    return found


def _timed_apart(runtime: str, files: dict, name: str, args) -> dict:
    """``time_runtime`` in a process of its own."""
    command = [sys.executable, __file__, "--time", runtime, "--files", json.dumps(files)]
    command += ["--model", name, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += [arg for batch in args.batch for arg in ("--batch", str(batch))]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return {int(b): ms for b, ms in json.loads(run.stdout.splitlines()[-1]).items()}


def held_out_outputs(files: dict, name: str, held_out: list[torch.Tensor]) -> dict:
    """Every artifact's outputs on the held-out images, one image at a time."""
    import openvino as ov

    core = ov.Core()
    outputs = {}
    for key in ("float f32", "fxcomp", "nncf"):
        compiled = core.compile_model(files[key], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outputs[key] = [torch.from_numpy(compiled([x[None].numpy()])[0]) for x in held_out]
    for key in ORT_KINDS:
        session = onnx_model.session(files[key])
        outputs[key] = [onnx_model.run(session, (x[None],)) for x in held_out]
    int8 = BACKENDS["torchscript"].load(
        files["fxcomp torchscript"], input_shapes=[[1, 3, 224, 224]]
    )
    with torch.no_grad():
        outputs["fxcomp torchscript"] = [int8(x[None]) for x in held_out]
    return {key: torch.cat(values) for key, values in outputs.items()}


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    data = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(args.calib_batches + 2)]
    calibration, held_out = data[:-2], torch.cat(data[-2:])
    model = prepared_model(name, calibration)
    with torch.no_grad():
        reference = torch.cat([model(x[None]) for x in held_out])
    files = make_artifacts(model, calibration, work / name)
    outputs = held_out_outputs(files, name, list(held_out))
    latency = {}
    for runtime in ("openvino", "onnxruntime", "torch"):
        for batch, ms in _timed_apart(runtime, files, name, args).items():
            latency.setdefault(batch, {}).update(ms)
    result = {
        "model": name,
        "sqnr_db": {key: sqnr(reference, outputs[key]) for key in INT8},
        "latency_ms": latency,
    }
    print(json.dumps(result))
    return result


def digits_accuracy(work: Path) -> dict:
    import openvino as ov

    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=False).eval()
    calibration = [x for x, _ in data.batches()]
    passes = [fuse(), quantize(calibration, engine="openvino", progress=False)]
    result = fxcomp.compile(model, data.test_x[:1], passes, "openvino", work / "digits")
    bundle = fxcomp.load_bundle(result.artifact.path)
    images = [image[None] for batch in calibration for image in batch]
    peer = ov.Core().compile_model(
        nncf_ir(model, [torch.cat(images)], work / "digits_nncf" / "model.xml"),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32"},
    )
    return {
        "float": accuracy(model, data.test_x, data.test_y),
        "int8 reference graph": accuracy(result.module, data.test_x, data.test_y),
        "int8 OpenVINO IR": accuracy(bundle, data.test_x, data.test_y),
        "NNCF OpenVINO IR": accuracy(
            lambda x: torch.cat([torch.from_numpy(peer([r[None].numpy()])[0]) for r in x]),
            data.test_x,
            data.test_y,
        ),
    }


def tables_of(results: list[dict], digits: dict) -> list:
    rows = []
    for r in results:
        for batch, ms in r["latency_ms"].items():
            rows.append(
                [
                    r["model"],
                    batch,
                    *(f"{ms[k]:.2f}" for k in ("float f32", "float bf16", "nncf", "fxcomp")),
                    f"{ms['fxcomp'] / ms['nncf']:.3f}",
                    f"{ms['float f32 (A/A)'] / ms['float f32']:.3f}",
                    f"{ms['fxcomp torchscript']:.2f}",
                    f"{ms['quantize_static']:.2f}",
                    f"{ms['fxcomp ort']:.2f}",
                    f"{ms['fxcomp'] / ms['fxcomp torchscript']:.3f}",
                    f"{ms['fxcomp'] / ms['quantize_static']:.3f}",
                ]
            )
    latency = (
        rows,
        [
            "model",
            "batch",
            "OV f32 ms",
            "OV bf16 ms",
            "NNCF ms",
            "fxcomp OV ms",
            "fxcomp / NNCF",
            "OV A/A",
            "fxcomp TorchScript ms",
            "ORT quantize_static ms",
            "fxcomp ORT ms",
            "fxcomp OV / TorchScript",
            "fxcomp OV / quantize_static",
        ],
    )
    quality = (
        [[r["model"], *(f"{r['sqnr_db'][k]:.2f}" for k in INT8)] for r in results],
        ["model", *(f"{k} SQNR dB" for k in INT8)],
    )
    accuracy_table = ([[k, f"{v:.2f}"] for k, v in digits.items()], ["digits CNN", "accuracy %"])
    return [latency, quality, accuracy_table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="torchvision model (repeatable)")
    parser.add_argument("--batch", action="append", type=int, help="batch sizes (default 1, 8)")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each artifact")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 8")
    parser.add_argument("--seed", type=int, default=1, help="seed of the noise batches")
    parser.add_argument("--time", help=argparse.SUPPRESS)  # a runtime's own timing process
    parser.add_argument("--files", help=argparse.SUPPRESS)
    add_output_options(parser)
    args = parser.parse_args()
    args.batch = args.batch or [1, 8]
    warnings.filterwarnings("ignore")
    if args.time:
        found = time_runtime(args.time, json.loads(args.files), args.model[0], args.batch, args)
        print(json.dumps(found))
        return
    models = args.model or [
        "resnet18",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "efficientnet_b0",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = [measure(name, args, work) for name in models]
        digits = digits_accuracy(work)
    output(
        "bench_openvino", args, tables_of(results, digits), {"models": results, "digits": digits}
    )


if __name__ == "__main__":
    main()
