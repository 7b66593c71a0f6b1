"""INT8 in ExecuTorch with XNNPACK: fxcomp's ``.pte`` against PT2E's ``XNNPACKQuantizer`` flow,
and against fxcomp's own lite-interpreter bundle.

    python examples/bench_executorch.py
    python examples/bench_executorch.py --model resnet18 --repeats 48 --json executorch.json

Programs per torchvision model, all made from the same random-weight float model
(``weights=None``; BatchNorm statistics first re-estimated on the input distribution, as
``examples/bench_onnx.py`` does), for batch 1 (``max_batch=1``: a static batch, as the
peer's export is):

* float: ``fxcomp.compile(model, x, [fuse()], backend="executorch")``, XNNPACK float;
* fxcomp: ``fxcomp.compile(model, x, [fuse(), quantize(calib, engine="xnnpack")],
  backend="executorch")``: int8 activations, int8 symmetric per-channel weights, fxcomp's
  default MSE observer;
* pt2e: the peer, as ExecuTorch's documentation gives it: ``torch.export``,
  ``prepare_pt2e`` with ``XNNPACKQuantizer`` and ``get_symmetric_quantization_config(
  is_per_channel=True)``, the same calibration batches, ``convert_pt2e``, ``torch.export``
  again, ``to_edge_transform_and_lower`` with ``XnnpackPartitioner``, ``to_executorch``;
* lite: fxcomp's mobile bundle of the same model (``quantize(engine="qnnpack")``,
  ``backend="mobile"``), the lite interpreter's qnnpack kernels.

Both quantizers calibrate on ``--calib-batches`` batches of 8 normal-noise images (seed
``--seed``); two further batches of 8 are held out. Measured per model:

* latency of one call at batch 1 in ms: the three ``.pte`` programs run in one ExecuTorch
  runtime (its own thread pool), warmed up ``--warmup`` times, then timed interleaved for
  ``--repeats`` rounds by ``fxcomp.runtime.latency.median_latency``, every order in turn,
  with ``fxcomp (A/A)`` (the fxcomp program under a second name: the noise floor of every
  ratio in its row). The lite bundles run PyTorch's OpenMP threads, which must not share a
  timing with ExecuTorch's pool, so they are timed the same way in a separate process
  (``--lite-only``), against an ExecuTorch-free float eager model for scale;
* SQNR in dB of each quantized program's output against the float model's on the 16
  held-out images, one at a time; and, since on these random-weight networks a 1% change
  of one grid moves MobileNetV3's figure by half a dB, its mean over ``--sqnr-seeds``
  noise seeds (calibration and held-out images drawn again, both quantizers run again),
  with a third program there: fxcomp's with ``quantize(..., bias_correction=True)``;
* file sizes, the ops XNNPACK runs, and the ops left to ExecuTorch's portable kernels.

The digits CNN (trained on scikit-learn's digits in seconds) gives accuracy: the float
model, fxcomp's INT8 reference graph, and its ``.pte``.

Transformers (``--encoder``, on by default): a BERT encoder of MiniLM-L6's shape (384 wide,
6 layers, random weights; ``examples/bench_transformers.py``'s), batch 1 x ``--length``
tokens: the float ``.pte``, fxcomp's ``quantize_dynamic(engine="xnnpack")`` ``.pte`` (every
Linear as XNNPACK's dynamically quantized linear), and PT2E's dynamic flow
(``get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)``; the table
gives its error where it fails), timed and compared on the last hidden state the same way.
``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from benchmarks_doc import add_output_options, output
from torch import nn

import fxcomp
from fxcomp.backends.executorch.program import ExecuTorchProgram, lower, require_executorch
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.passes import fuse, quantize, quantize_dynamic
from fxcomp.runtime.latency import median_latency
from fxcomp.runtime.parity import sqnr

PROGRAMS = ("float", "pt2e", "fxcomp")
CORRECTED = "fxcomp + bias correction"
VARIANTS = {"fxcomp": {}, CORRECTED: {"bias_correction": True}}  # fxcomp's programs
SINGLE = {"max_batch": 1}


def prepared_model(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.get_model(name, weights=None), data)


def pt2e_program(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]):
    """The peer's ``.pte``: PT2E with XNNPACKQuantizer, lowered as ExecuTorch documents."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    converted = convert_pt2e(prepared)
    return lower(converted, (x,), max_batch=1)


def int8_passes(calibration: list[torch.Tensor], **options: Any) -> list:
    """fxcomp's INT8 for XNNPACK; ``options`` go to ``quantize``."""
    return [fuse(), quantize(calibration, engine="xnnpack", progress=False, **options)]


def pte_bundle(model: nn.Module, x: torch.Tensor, passes: list, out: Path):
    """fxcomp's ``.pte`` bundle of ``model`` after ``passes``, for batch 1."""
    return fxcomp.compile(model, x, passes, "executorch", out, backend_options=SINGLE).artifact


def one_by_one(program, images: torch.Tensor) -> torch.Tensor:
    """``program``'s outputs for ``images``, run at batch 1."""
    return torch.cat([program(row[None]) for row in images])


def make_programs(model: nn.Module, calibration: list[torch.Tensor], out: Path) -> dict:
    x = calibration[0][:1]
    made = {}
    for key, passes in (("float", [fuse()]), ("fxcomp", int8_passes(calibration))):
        artifact = pte_bundle(model, x, passes, out / key)
        made[key] = {
            "program": fxcomp.load_bundle(artifact.path).module,
            "bytes": artifact.manifest["members"]["model.pte"]["bytes"],
            "xnnpack": sum(artifact.manifest["delegation"]["xnnpack"].values()),
            "portable": sorted({p["op"] for p in artifact.manifest["delegation"]["portable"]}),
        }
    peer = pt2e_program(model, x, calibration)
    made["pt2e"] = {
        "program": ExecuTorchProgram(peer.program),
        "bytes": len(peer.program),
        "xnnpack": sum(peer.delegated.values()),
        "portable": sorted({p["op"] for p in peer.portable}),
    }
    lite = fxcomp.compile(
        model,
        x,
        [fuse(), quantize(calibration, engine="qnnpack", progress=False)],
        "mobile",
        out / "lite",
    ).artifact
    made["lite"] = {"path": str(lite.path), "bytes": lite.manifest["members"]["model.ptl"]["bytes"]}
    return made


def time_programs(programs: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict:
    runs = {key: programs[key]["program"] for key in PROGRAMS}
    for run in runs.values():
        for _ in range(warmup):
            run(x)
    runs["fxcomp (A/A)"] = runs["fxcomp"]
    return {key: ms[0] for key, ms in median_latency(runs, [(x,)], repeats).items()}


def time_lite(path: str, model_name: str, repeats: int, warmup: int) -> dict:
    """In this (separate) process: the lite bundle against the float eager model."""
    bundle = fxcomp.load_bundle(path)
    x = bundle.sample_inputs[0]
    float_model = torchvision.models.get_model(model_name, weights=None).eval()
    runs = {"lite": bundle, "float eager": torch.no_grad()(float_model)}
    for run in runs.values():
        for _ in range(warmup):
            run(x)
    runs["lite (A/A)"] = bundle
    return {key: ms[0] for key, ms in median_latency(runs, [(x,)], repeats).items()}


def noise_data(seed: int, calib_batches: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``calib_batches`` calibration batches of 8 normal-noise images, and 16 held out."""
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(calib_batches + 2)]
    return data[:-2], torch.cat(data[-2:])


def int8_programs(
    model: nn.Module,
    calibration: list[torch.Tensor],
    out: Path,
    variants: Mapping[str, dict[str, Any]] = VARIANTS,
) -> dict:
    """The peer's INT8 program of ``model`` for batch 1 and fxcomp's, one per ``variants``
    entry (name -> ``quantize`` options), calibrated on ``calibration``, as callables
    (bundles written under ``out``)."""
    x = calibration[0][:1]
    programs = {"pt2e": ExecuTorchProgram(pt2e_program(model, x, calibration).program)}
    for key, options in variants.items():
        passes = int8_passes(calibration, **options)
        bundle = pte_bundle(model, x, passes, out / key.replace(" ", "-"))
        programs[key] = fxcomp.load_bundle(bundle.path).module
    return programs


def int8_sqnr(name: str, seed: int, calib_batches: int, work: Path) -> dict[str, float]:
    """SQNR against float of the peer's and fxcomp's INT8 ``.pte`` made with noise ``seed``."""
    calibration, held_out = noise_data(seed, calib_batches)
    model = prepared_model(name, calibration)
    programs = int8_programs(model, calibration, work / f"{name}-{seed}")
    with torch.no_grad():
        reference = model(held_out)
    return {key: sqnr(reference, one_by_one(p, held_out)) for key, p in programs.items()}


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    calibration, held_out = noise_data(args.seed, args.calib_batches)
    model = prepared_model(name, calibration)
    made = make_programs(model, calibration, work / name)
    with torch.no_grad():
        reference = model(held_out)
    outputs = {key: one_by_one(made[key]["program"], held_out) for key in PROGRAMS}
    ms = time_programs(made, held_out[:1], args.repeats, args.warmup)
    lite_run = subprocess.run(
        [sys.executable, __file__, "--lite-only", made["lite"]["path"], "--model", name,
         "--repeats", str(args.repeats), "--warmup", str(args.warmup)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lite_ms = json.loads(lite_run.stdout.strip().splitlines()[-1])
    print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in {**ms, **lite_ms}.items()))
    first = {key: sqnr(reference, outputs[key]) for key in ("pt2e", "fxcomp")}
    passes = int8_passes(calibration, bias_correction=True)
    corrected = pte_bundle(model, calibration[0][:1], passes, work / f"{name}-corrected")
    first[CORRECTED] = sqnr(
        reference, one_by_one(fxcomp.load_bundle(corrected.path).module, held_out)
    )
    seeds = range(args.seed + 1, args.seed + args.sqnr_seeds)
    by_seed = [first] + [int8_sqnr(name, seed, args.calib_batches, work) for seed in seeds]
    print(f"{name}: SQNR by seed {by_seed}")
    return {
        "model": name,
        "latency_ms": ms,
        "lite_latency_ms": lite_ms,
        "sqnr_db": first,
        "sqnr_db_by_seed": by_seed,
        "float_pte_sqnr_db": sqnr(reference, outputs["float"]),
        "size_mib": {key: made[key]["bytes"] / 2**20 for key in (*PROGRAMS, "lite")},
        "xnnpack_ops": {key: made[key]["xnnpack"] for key in PROGRAMS},
        "portable_ops": {key: made[key]["portable"] for key in PROGRAMS},
    }


def digits_accuracy(work: Path) -> dict:
    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=False)
    passes = int8_passes([x for x, _ in data.batches()])
    result = fxcomp.compile(model, data.test_x[:1], passes, "executorch", work / "digits")
    bundle = fxcomp.load_bundle(result.artifact.path)
    rows = bundle.manifest["max_batch"]

    def in_batches(x):
        return torch.cat([bundle(part) for part in x.split(rows)])

    return {
        "float": accuracy(model, data.test_x, data.test_y),
        "int8 reference graph": accuracy(result.module, data.test_x, data.test_y),
        "int8 .pte": accuracy(in_batches, data.test_x, data.test_y),
    }


def encoder_programs(length: int) -> dict:
    """BERT (MiniLM-L6's shape): float, fxcomp dynamic INT8 and PT2E dynamic INT8 ``.pte``."""
    from bench_transformers import encoder
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from fxcomp.cli.zoo import text_inputs

    model, inputs = encoder(), text_inputs(1, length)
    made = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, passes in (("float", []), ("fxcomp", [quantize_dynamic(engine="xnnpack")])):
            artifact = fxcomp.compile(
                model, inputs, passes, "executorch", Path(tmp) / key, backend_options=SINGLE
            ).artifact
            made[key] = fxcomp.load_bundle(artifact.path).module
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    exported = torch.export.export(model, (), kwargs=inputs).module()
    try:  # the peer: dynamic quantization needs no calibration
        prepared = prepare_pt2e(exported, XNNPACKQuantizer().set_global(config))
        converted = _Positional(convert_pt2e(prepared), list(inputs))
        made["pt2e"] = ExecuTorchProgram(
            lower(converted, tuple(inputs.values()), max_batch=1).program
        )
    except Exception as err:  # PT2E's prepare breaks Hugging Face BERT's exported graph
        made["pt2e"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        print(f"pt2e fails: {made['pt2e']}")
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
    x = tuple(inputs.values())
    return {"programs": made, "inputs": x, "reference": reference}


class _Positional(nn.Module):
    """A keyword-input model called positionally, its first output only (for ``lower``)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs, strict=True)))
        return out[0] if isinstance(out, tuple | list) else out.last_hidden_state


def measure_encoder(args: argparse.Namespace) -> dict:
    made = encoder_programs(args.length)
    x = made["inputs"]
    programs = {k: p for k, p in made["programs"].items() if not isinstance(p, str)}
    failed = {k: p for k, p in made["programs"].items() if isinstance(p, str)}
    outputs = {key: program(*x) for key, program in programs.items()}
    first = {key: out[0] if isinstance(out, tuple) else out for key, out in outputs.items()}
    for program in programs.values():
        for _ in range(args.warmup):
            program(*x)
    runs = dict(programs)
    runs["fxcomp (A/A)"] = programs["fxcomp"]
    ms = {key: v[0] for key, v in median_latency(runs, [x], args.repeats).items()}
    print("encoder: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return {
        "latency_ms": ms,
        "sqnr_db": {key: sqnr(made["reference"], first[key]) for key in first},
        "failed": failed,
    }


def sqnr_row(result: dict) -> list[str]:
    by_seed = result["sqnr_db_by_seed"]
    row = [result["model"]]
    row += [f"{statistics.mean(seed[k] for seed in by_seed):.2f}" for k in ("pt2e", "fxcomp")]
    row.append(f"{statistics.mean(seed[CORRECTED] for seed in by_seed):.2f}")
    for key in ("fxcomp", CORRECTED):
        gaps = [seed[key] - seed["pt2e"] for seed in by_seed]
        row += [f"{statistics.mean(gaps):+.2f}", " ".join(f"{gap:+.2f}" for gap in gaps)]
    return row


def tables_of(results: list[dict], digits: dict, encoder: dict | None) -> list:
    speed = []
    for r in results:
        ms, lite = r["latency_ms"], r["lite_latency_ms"]
        speed.append(
            [
                r["model"],
                *(f"{ms[k]:.2f}" for k in PROGRAMS),
                f"{ms['fxcomp'] / ms['pt2e']:.3f}",
                f"{ms['fxcomp (A/A)'] / ms['fxcomp']:.3f}",
                f"{ms['float'] / ms['fxcomp']:.2f}x",
                f"{r['sqnr_db']['pt2e']:.2f}",
                f"{r['sqnr_db']['fxcomp']:.2f}",
                f"{lite['lite']:.2f}",
                f"{lite['lite (A/A)'] / lite['lite']:.3f}",
                f"{lite['float eager'] / lite['lite']:.2f}x",
            ]
        )
    sizes = [
        [
            r["model"],
            *(f"{r['size_mib'][k]:.2f}" for k in (*PROGRAMS, "lite")),
            *(str(r["xnnpack_ops"][k]) for k in PROGRAMS),
            *(", ".join(r["portable_ops"][k]) or "none" for k in PROGRAMS),
        ]
        for r in results
    ]
    tables = [
        (
            speed,
            [
                "model",
                *(f"{k} .pte ms" for k in PROGRAMS),
                "fxcomp / pt2e",
                "A/A",
                "fxcomp speed-up vs float .pte",
                "pt2e SQNR dB",
                "fxcomp SQNR dB",
                "lite int8 ms",
                "lite A/A",
                "lite speed-up vs float eager",
            ],
        ),
        (
            sizes,
            [
                "model",
                *(f"{k} .pte MiB" for k in PROGRAMS),
                "lite int8 .ptl MiB",
                *(f"{k} XNNPACK ops" for k in PROGRAMS),
                *(f"{k} portable ops" for k in PROGRAMS),
            ],
        ),
        (
            [sqnr_row(r) for r in results],
            [
                f"SQNR dB over {len(results[0]['sqnr_db_by_seed'])} noise seeds",
                "pt2e mean",
                "fxcomp mean",
                "fxcomp + bias correction mean",
                "fxcomp - pt2e, mean",
                "fxcomp - pt2e, each seed",
                "corrected - pt2e, mean",
                "corrected - pt2e, each seed",
            ],
        ),
        ([[k, f"{v:.2f}"] for k, v in digits.items()], ["digits CNN", "test accuracy %"]),
    ]
    if encoder is not None:
        ms, db, failed = encoder["latency_ms"], encoder["sqnr_db"], encoder["failed"]
        rows = [
            [
                name,
                f"{ms[name]:.2f}" if name in ms else "fails",
                f"{ms[name] / ms['float']:.3f}" if name in ms else "",
                f"{db[name]:.2f}" if name in db else failed.get(name, ""),
            ]
            for name in (*PROGRAMS, "fxcomp (A/A)")
        ]
        headers = ["BERT 384x6, batch 1, .pte", "ms", "/ float", "SQNR dB vs float (or error)"]
        tables.append((rows, headers))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="torchvision model (repeatable)")
    parser.add_argument("--repeats", type=int, default=48, help="timed rounds: every order once")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each program")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 8")
    parser.add_argument("--seed", type=int, default=1, help="seed of the noise batches")
    parser.add_argument(
        "--sqnr-seeds", type=int, default=5, help="noise seeds from --seed to average SQNR over"
    )
    parser.add_argument("--length", type=int, default=128, help="the encoder's tokens")
    parser.add_argument(
        "--encoder", action=argparse.BooleanOptionalAction, default=True, help="time BERT too"
    )
    parser.add_argument("--lite-only", help=argparse.SUPPRESS)  # the separate timing process
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.lite_only:
        print(json.dumps(time_lite(args.lite_only, args.model[0], args.repeats, args.warmup)))
        return
    require_executorch()
    models = args.model or ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = [measure(name, args, work) for name in models]
        digits = digits_accuracy(work)
    encoder = measure_encoder(args) if args.encoder else None
    numbers = {"models": results, "digits": digits, "encoder": encoder}
    output("bench_executorch", args, tables_of(results, digits, encoder), numbers)


if __name__ == "__main__":
    main()
