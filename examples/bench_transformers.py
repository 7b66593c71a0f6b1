"""A small sentence encoder (6 layers, 384 wide: the shape of MiniLM-L6) compressed three
ways and timed side by side.

    python examples/bench_transformers.py [--batch 1 --batch 8] [--length 128] [--rounds 30]

PyTorch, in one process, interleaved, every order of the models in turn, medians, with an
A/A line (fxcomp's dynamic INT8 timed under two names): the float Hugging Face model;
torch.ao's ``quantize_dynamic`` on it; fxcomp's ``quantize_dynamic`` (captured with
``torch.export``, Linear layers on fbgemm's dynamic kernels), as a GraphModule and as frozen
TorchScript; and fxcomp's static INT8 (``smooth_quant`` then ``quantize``, x86) as frozen
TorchScript. ONNX Runtime, in a process of its own (its threads never share a timing with
PyTorch's): the float ONNX file fxcomp writes, and ONNX Runtime's own ``quantize_dynamic``
of it (MatMulInteger). Each quantized model's output is compared with float's by cosine
similarity on held-out inputs. Random weights; nothing is downloaded. Capture time: export
and lift of the encoder against symbolic tracing of torchvision's resnet18.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from benchmarks_doc import add_output_options, output, table

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.cli.zoo import text_inputs
from fxcomp.passes import fuse, quantize, quantize_dynamic, smooth_quant
from fxcomp.runtime.latency import describe_cpu, median_latency


def encoder(width: int = 384, layers: int = 6) -> torch.nn.Module:
    """A BERT encoder: 384 x 6 is MiniLM-L6's shape, 768 x 12 BERT-base's."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // 32,
        intermediate_size=4 * width,
    )
    return BertModel(config).eval()


def capture_seconds(length: int) -> dict[str, float]:
    """Export and lift of BERT-base against symbolic tracing of torchvision's ViT-B/16 (86M
    against 110M parameters), and whole compiles of BERT-base: dynamic INT8, and static INT8
    with SmoothQuant calibrated on 8 batches of 8 sequences."""
    base, vit, example = encoder(768, 12), torchvision.models.vit_b_16(), text_inputs(1, length)
    calibration = [tuple(text_inputs(8, length, seed=s).values()) for s in range(8)]
    static = [fuse(), smooth_quant(calibration), quantize(calibration, progress=False)]
    seconds = {}
    for name, run in (
        ("BERT-base export + lift", lambda: fxcomp.trace(base, example)),
        ("ViT-B/16 symbolic tracing", lambda: fxcomp.trace(vit, torch.randn(1, 3, 224, 224))),
        (
            "BERT-base compile with quantize_dynamic",
            lambda: fxcomp.compile(base, example, passes=[quantize_dynamic()]),
        ),
        (
            "BERT-base compile with smooth_quant + quantize",
            lambda: fxcomp.compile(base, example, passes=static),
        ),
    ):
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    return seconds


def hidden(outputs: object) -> torch.Tensor:
    return outputs["last_hidden_state"] if isinstance(outputs, dict) else outputs[0]


def compressed(model: torch.nn.Module, length: int, work: Path) -> dict[str, object]:
    """The PyTorch forms to time, each taking (input_ids, attention_mask)."""
    example = text_inputs(1, length)
    calibration = [tuple(text_inputs(8, length, seed=s).values()) for s in range(4)]
    torchscript = BACKENDS["torchscript"]
    dynamic = fxcomp.compile(model, example, passes=[quantize_dynamic()])
    dynamic_ts = fxcomp.compile(
        model, example, passes=[quantize_dynamic()], backend="torchscript", output_dir=work / "d"
    )
    static_ts = fxcomp.compile(
        model,
        example,
        passes=[fuse(), smooth_quant(calibration), quantize(calibration, progress=False)],
        backend="torchscript",
        output_dir=work / "s",
    )
    ao = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return {
        "float (HF eager)": lambda ids, mask: model(input_ids=ids, attention_mask=mask),
        "torch.ao quantize_dynamic": lambda ids, mask: ao(input_ids=ids, attention_mask=mask),
        "fxcomp quantize_dynamic": dynamic.module,
        "fxcomp quantize_dynamic (A/A)": dynamic.module,
        "fxcomp quantize_dynamic TorchScript": torchscript.load(dynamic_ts.artifact),
        "fxcomp static INT8 TorchScript": torchscript.load(static_ts.artifact),
    }


def onnx_files(model: torch.nn.Module, length: int, work: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    example = text_inputs(1, length)
    float_file = fxcomp.compile(model, example, backend="onnx", output_dir=work / "f")
    path = float_file.artifact.path
    ort_dynamic(str(path), str(work / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
    ours = fxcomp.compile(
        model,
        example,
        passes=[quantize_dynamic(engine="ort")],
        backend="onnx",
        output_dir=work / "o",
    )
    return {
        "ORT float": path,
        "ORT quantize_dynamic": work / "ort_dynamic.onnx",
        "fxcomp quantize_dynamic(engine='ort') in ORT": ours.artifact.path,
    }


def time_onnx(files: dict[str, str], batches: list[int], length: int, rounds: int) -> dict:
    """In this process (run alone): ONNX Runtime sessions interleaved, medians; each
    file's output on the held-out inputs saved beside it."""
    runners = {k: BACKENDS["onnx"].runner(v) for k, v in files.items()}
    inputs = [tuple(text_inputs(b, length, seed=10 + b).values()) for b in batches]
    ms = median_latency(runners, inputs, rounds)
    held_out = tuple(text_inputs(16, length, seed=99).values())
    outputs = {}
    for name, run in runners.items():
        outputs[name] = f"{files[name]}.out.pt"
        torch.save(run(*held_out), outputs[name])
    return {"ms": ms, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", action="append", type=int, help="default: 1 and 8")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--onnx-worker", help=argparse.SUPPRESS)
    add_output_options(parser)
    args = parser.parse_args()
    batches = args.batch or [1, 8]
    warnings.filterwarnings("ignore")
    if args.onnx_worker:  # the ONNX Runtime half, in its own process
        files = json.loads(args.onnx_worker)
        print(json.dumps(time_onnx(files, batches, args.length, args.rounds)))
        return
    seconds = capture_seconds(args.length)
    model = encoder()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = compressed(model, args.length, work)
        files = onnx_files(model, args.length, work)
        inputs = [tuple(text_inputs(b, args.length, seed=10 + b).values()) for b in batches]
        ms = median_latency(models, inputs, args.rounds)
        held_out = tuple(text_inputs(16, args.length, seed=99).values())
        with torch.no_grad():
            outs = {name: hidden(m(*held_out)) for name, m in models.items()}
        worker = [
            sys.executable,
            __file__,
            "--onnx-worker",
            json.dumps({k: str(v) for k, v in files.items()}),
        ]
        worker += [f"--batch={b}" for b in batches] + [
            f"--length={args.length}",
            f"--rounds={args.rounds}",
        ]
        onnx = json.loads(subprocess.run(worker, capture_output=True, text=True, check=True).stdout)
        onnx_outs = {k: torch.load(v, weights_only=True) for k, v in onnx["outputs"].items()}
    reference = outs["float (HF eager)"]
    rows = []
    for name, values in [*ms.items(), *onnx["ms"].items()]:
        out = outs[name] if name in outs else onnx_outs[name]
        base = ms["float (HF eager)"] if name in ms else onnx["ms"]["ORT float"]
        similarity = F.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
        row = {"model": name, "cosine to float": f"{similarity:.4f}"}
        for b, value, float_value in zip(batches, values, base, strict=True):
            row[f"batch {b} ms"] = f"{value:.2f}"
            row[f"batch {b} speed-up"] = f"{float_value / value:.2f}x"
        rows.append(row)
    print(f"{describe_cpu()}; length {args.length}")
    timing = [{"step": name, "seconds": f"{value:.2f}"} for name, value in seconds.items()]
    results = {"rows": rows, "capture": timing}
    output("bench_transformers", args, [table(rows), table(timing)], results)


if __name__ == "__main__":
    main()
