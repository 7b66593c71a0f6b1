"""INT8 in ONNX Runtime: fxcomp's QDQ file against ONNX Runtime's own ``quantize_static``.

    python examples/bench_onnx.py --model resnet18 --model resnet50 --model mobilenet_v2
    python examples/bench_onnx.py --model resnet18 --batch 1 --batch 8 --json onnx.json

Four ONNX files per torchvision model, all made from the same random-weight float model
(``weights=None``; BatchNorm statistics first re-estimated on the input distribution, as
random weights otherwise give degenerate activations, exactly as
``examples/bench_quantize.py`` does):

* float: ``fxcomp.compile(model, x, passes=[fuse()], backend="onnx")``;
* fxcomp: ``fxcomp.compile(model, x, passes=[fuse(), quantize(calib, engine="ort")],
  backend="onnx")``: QDQ, uint8 activations, int8 per-channel weights;
* fxcomp_bc: the same with ``quantize(..., bias_correction=True)`` (each layer's bias takes
  off the mean output shift its weight rounding causes, measured on the same batches);
* quantize_static: ONNX Runtime's ``quant_pre_process`` on the float file, then
  ``quantize_static`` in its fastest configuration here: ``QuantFormat.QDQ``, ``QUInt8``
  activations, ``QInt8`` weights, ``per_channel=True``, ``--calibrate-method`` (default
  MinMax, ONNX Runtime's own default), through a ``CalibrationDataReader``, and
  ``reduce_range`` (7-bit weights) exactly where fxcomp's ``ort`` scheme takes it: on x86
  CPUs without VNNI, where ONNX Runtime's uint8 x int8 kernels saturate on full-range
  weights (``fxcomp.quant.scheme.int8_dot_saturates``).

Both quantizers calibrate on the same batches as ``bench_quantize.py``: ``--calib-batches``
batches of 8 normal-noise images (the input distribution the BatchNorm statistics were
estimated on), generator seed ``--seed`` (default 1); two further batches of 8 are held out.

Measured per model:

* latency of one ``session.run`` in ms at each ``--batch`` (input Bx3x224x224, default 1):
  every session comes from ``fxcomp.backends.onnx.backend.load`` (CPU execution provider,
  ``session.intra_op.allow_spinning`` = "0", so the four sessions in one process do not
  steal each other's cores; ``--threads`` sets ``intra_op_num_threads``), each is warmed up
  ``--warmup`` times at that batch size, then the four are timed interleaved for
  ``--repeats`` rounds by ``fxcomp.runtime.latency.median_latency``, going through every
  order of them in turn (none always runs right after the float model's cache-flushing
  run); no PyTorch work runs beside the sessions' threads while they are timed. The table
  gives medians, the speed-up of each over float, each fxcomp file's latency as a ratio of
  quantize_static's (lower is better), and an A/A ratio (the fxcomp session timed under a
  second name against itself: the noise floor of every ratio in its row);
* SQNR in dB of each quantized file's output against the float file's output on the
  held-out batches (``fxcomp.runtime.parity.sqnr``);
* file sizes, and the operator counts of each file after ONNX Runtime's graph optimization
  (the graph the CPU provider actually runs, dumped with ``optimized_model_filepath``): the
  QLinear*/QGemm nodes run in INT8, the rest in float; QuantizeLinear/DequantizeLinear left
  in the optimized graph are real conversions at run time.

``--keep DIR`` keeps the ONNX files and the optimized graphs; ``--json PATH`` writes every
number.
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from benchmarks_doc import add_output_options, output
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

import fxcomp
from fxcomp.backends.onnx import backend as onnx_model
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.quant.scheme import int8_dot_saturates
from fxcomp.runtime.latency import median_latency
from fxcomp.runtime.parity import sqnr

KINDS = ("float", "quantize_static", "fxcomp", "fxcomp_bc")
QUANTIZED = KINDS[1:]
OURS = QUANTIZED[1:]
# Operators of the optimized graphs, first in the table in this order (then the others).
OPS = (
    "QLinearConv",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
    "QGemm",
    "QuantizeLinear",
    "DequantizeLinear",
)


class Batches(CalibrationDataReader):
    """The calibration batches, as numpy feeds, for ``quantize_static``."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.feeds = [{"input": b.numpy()} for b in batches]
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:
        self.items = iter(self.feeds)


def prepared_model(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.get_model(name, weights=None), data)


def make_files(
    model: nn.Module, calibration: list[torch.Tensor], out: Path, method: str
) -> dict[str, Path]:
    """The float file, ONNX Runtime's QDQ file and fxcomp's QDQ files."""
    x = calibration[0][:1]
    passes = [fxcomp.passes.fuse()]
    files = {"float": fxcomp.compile(model, x, passes, "onnx", out / "float").artifact.path}
    for key, correct in (("fxcomp", False), ("fxcomp_bc", True)):
        passes = [
            fxcomp.passes.fuse(),
            fxcomp.passes.quantize(
                calibration, engine="ort", bias_correction=correct, progress=False
            ),
        ]
        files[key] = fxcomp.compile(model, x, passes, "onnx", out / key).artifact.path
    files["quantize_static"] = quantize_static_file(files["float"], calibration, out, method)
    return {key: files[key] for key in KINDS}


def quantize_static_file(
    float_file: Path, calibration: list[torch.Tensor], out: Path, method: str = "MinMax"
) -> Path:
    """ONNX Runtime's ``quantize_static`` of ``float_file`` in its fastest configuration here
    (module docstring), as ``out/quantize_static.onnx``."""
    prepared, peer = out / "float_preprocessed.onnx", out / "quantize_static.onnx"
    quant_pre_process(str(float_file), str(prepared))
    quantize_static(
        str(prepared),
        str(peer),
        Batches(calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=int8_dot_saturates(),
        calibrate_method=CalibrationMethod[method],
    )
    return peer


def optimized_ops(path: Path, threads: int | None) -> dict[str, int]:
    """Operator counts of ``path`` after ONNX Runtime's graph optimization (same options as
    ``onnx_model.session``, plus the dump)."""
    dump = path.with_name(path.stem + ".ort_optimized.onnx")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(dump)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(node.op_type for node in onnx.load(str(dump)).graph.node)
    return dict(counts.most_common())


def latency_ms(
    sessions: dict[str, ort.InferenceSession], x: torch.Tensor, repeats: int, warmup: int
) -> dict[str, float]:
    """Median ms per ``session.run`` at ``x``'s batch size, with ``fxcomp (A/A)``: the
    sessions interleaved, every order in turn (``median_latency``)."""
    feeds = {"input": x.numpy()}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)
    runs = {key: functools.partial(session.run, None) for key, session in sessions.items()}
    runs["fxcomp (A/A)"] = runs["fxcomp"]
    ms = median_latency(runs, [(feeds,)], repeats)
    return {key: values[0] for key, values in ms.items()}


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    data = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(args.calib_batches + 2)]
    calibration, held_out = data[:-2], data[-2:]
    model = prepared_model(name, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = make_files(model, calibration, work / name, args.calibrate_method)
    sessions = {key: onnx_model.session(path, threads=args.threads) for key, path in files.items()}
    outputs = {
        key: torch.cat([onnx_model.run(s, (h,)) for h in held_out]) for key, s in sessions.items()
    }
    result = {
        "model": name,
        "calibration": f"{len(calibration)} batches of 8, normal noise",
        "calibrate_method": args.calibrate_method,
        "sqnr_db": {key: sqnr(outputs["float"], outputs[key]) for key in QUANTIZED},
        "size_mib": {key: path.stat().st_size / 2**20 for key, path in files.items()},
        "optimized_ops": {key: optimized_ops(path, args.threads) for key, path in files.items()},
        "latency_ms": {},
    }
    for batch in args.batch:
        x = held_out[0][:batch] if batch <= 8 else torch.randn(batch, 3, 224, 224)
        ms = latency_ms(sessions, x, args.repeats, args.warmup)
        result["latency_ms"][batch] = ms
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return result


def latency_rows(r: dict) -> list[list[object]]:
    rows = []
    for batch, ms in r["latency_ms"].items():
        rows.append(
            [
                r["model"],
                batch,
                *(f"{ms[k]:.2f}" for k in KINDS),
                *(f"{ms['float'] / ms[k]:.2f}x" for k in QUANTIZED),
                *(f"{ms[k] / ms['quantize_static']:.3f}" for k in OURS),
                f"{ms['fxcomp (A/A)'] / ms['fxcomp']:.3f}",
                *(f"{r['sqnr_db'][k]:.2f}" for k in QUANTIZED),
            ]
        )
    return rows


def size_row(r: dict) -> list[object]:
    return [r["model"], *(f"{r['size_mib'][k]:.2f}" for k in KINDS)]


def op_columns(results: list[dict]) -> list[str]:
    """Every operator of the optimized graphs: ``OPS`` first, then by total count."""
    totals: collections.Counter = collections.Counter()
    for r in results:
        for counts in r["optimized_ops"].values():
            totals.update(counts)
    return [*OPS, *(op for op, _ in totals.most_common() if op not in OPS)]


def ops_rows(r: dict, columns: list[str]) -> list[list[object]]:
    return [
        [r["model"], key, sum(counts.values()), *(counts.get(op, 0) for op in columns)]
        for key, counts in r["optimized_ops"].items()
    ]


def tables_of(results: list[dict]) -> list[tuple[list[list[object]], list[str]]]:
    method = results[0]["calibrate_method"]
    columns = op_columns(results)
    tables = [
        (
            [row for r in results for row in latency_rows(r)],
            [
                "model",
                "batch",
                *(f"{k} ms" for k in KINDS),
                *(f"{k} speed-up" for k in QUANTIZED),
                *(f"{k} / quantize_static" for k in OURS),
                "A/A",
                f"quantize_static ({method}) SQNR dB",
                *(f"{k} SQNR dB" for k in OURS),
            ],
        ),
        (
            [size_row(r) for r in results],
            ["model", *(f"{k} MiB" for k in KINDS)],
        ),
        (
            [row for r in results for row in ops_rows(r, columns)],
            ["model", "file", "nodes", *columns],
        ),
    ]
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="torchvision model (repeatable)")
    parser.add_argument("--batch", action="append", type=int, help="batch size (default: 1)")
    parser.add_argument("--repeats", type=int, default=120, help="timed rounds: every order once")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each session")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 8")
    parser.add_argument("--seed", type=int, default=1, help="seed of the noise batches")
    parser.add_argument(
        "--calibrate-method",
        default="MinMax",
        choices=[m.name for m in CalibrationMethod],
        help="quantize_static's calibration (default: MinMax)",
    )
    parser.add_argument("--threads", type=int, help="intra_op_num_threads (default: ORT's)")
    parser.add_argument("--keep", help="write the ONNX files and optimized graphs here")
    add_output_options(parser)
    args = parser.parse_args()
    args.batch = args.batch or [1]
    warnings.filterwarnings("ignore")
    ort.set_default_logger_severity(3)  # not the warning that optimized dumps are host-specific
    models = args.model or ["resnet18", "resnet50", "mobilenet_v2"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        results = [measure(name, args, work) for name in models]
    output("bench_onnx", args, tables_of(results), results)


if __name__ == "__main__":
    main()
