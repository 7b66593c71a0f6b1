"""INT8 in ONNX Runtime: fxcomp's QDQ file against ONNX Runtime's own ``quantize_static``.

    python examples/bench_onnx.py [--model resnet18 ...] [--batch 1 --batch 8]

Three files per model, all from the same random-weight model (BatchNorm statistics first
re-estimated on the input distribution, as random weights otherwise give degenerate
activations): the float ONNX (``fxcomp.compile(..., backend="onnx")``), fxcomp's QDQ file
(``quantize(engine="ort")``: uint8 activations, int8 per-channel weights), and ONNX
Runtime's ``quantize_static`` in its fastest configuration here: ``quant_pre_process`` on the
float file, then QDQ format, uint8 activations, int8 per-channel weights, MinMax
calibration on the same batches. Every session is made by ``fxcomp.backends.onnx_model.load``
(CPU provider, intra-op thread spinning off, so sessions do not steal each other's cores);
the three are timed interleaved after warm-ups, and the table gives medians. SQNR is
against the float file's output on held-out inputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tabulate import tabulate
from torch import nn

import fxcomp
from fxcomp.backends import onnx_model
from fxcomp.batchnorm import reestimate_batchnorm
from fxcomp.verify import sqnr

KINDS = ("float", "quantize_static", "fxcomp")


class _Batches(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = iter([{"input": b.numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def prepared_model(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.get_model(name, weights=None), data)


def make_files(model: nn.Module, calibration: list[torch.Tensor], out: Path) -> dict[str, Path]:
    """The float file, ONNX Runtime's QDQ file and fxcomp's QDQ file."""
    x = calibration[0][:1]
    fuse = fxcomp.passes.fuse()
    float_file = fxcomp.compile(model, x, [fuse], "onnx", out / "float").artifact.path
    passes = [fuse, fxcomp.passes.quantize(calibration, engine="ort", progress=False)]
    ours = fxcomp.compile(model, x, passes, "onnx", out / "fxcomp", engine="ort").artifact.path
    prepared, peer = out / "prepared.onnx", out / "quantize_static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(float_file), str(prepared))
        quantize_static(
            str(prepared),
            str(peer),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return {"float": float_file, "quantize_static": peer, "fxcomp": ours}


def latency_ms(sessions: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per call, the sessions interleaved."""
    feeds = {"input": x.numpy()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feeds)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(repeats):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def measure(name: str, batches: list[int], repeats: int) -> list[list[object]]:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(6)]
    calibration, held_out = data[:4], data[4:]
    model = prepared_model(name, calibration[:2])
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(model, calibration, Path(tmp))
        sessions = {key: onnx_model.load(path) for key, path in files.items()}
        outputs = {
            key: torch.cat([onnx_model.run(s, (h,)) for h in held_out])
            for key, s in sessions.items()
        }
        sizes = {key: path.stat().st_size / 2**20 for key, path in files.items()}
        rows = []
        for batch in batches:
            ms = latency_ms(sessions, held_out[0][:batch], repeats)
            rows.append(
                [
                    name,
                    batch,
                    *(f"{ms[k]:.2f}" for k in KINDS),
                    f"{ms['float'] / ms['quantize_static']:.2f}x",
                    f"{ms['float'] / ms['fxcomp']:.2f}x",
                    f"{ms['fxcomp'] / ms['quantize_static']:.2f}",
                    f"{sqnr(outputs['float'], outputs['quantize_static']):.2f}",
                    f"{sqnr(outputs['float'], outputs['fxcomp']):.2f}",
                    " / ".join(f"{sizes[k]:.1f}" for k in KINDS),
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="torchvision model (repeatable)")
    parser.add_argument("--batch", action="append", type=int, help="batch size (repeatable)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for name in args.model or ["resnet18", "resnet50", "mobilenet_v2"]:
        rows += measure(name, args.batch or [1], args.repeats)
    headers = [
        "model",
        "batch",
        "float ms",
        "quantize_static ms",
        "fxcomp ms",
        "peer speed-up",
        "fxcomp speed-up",
        "fxcomp / peer",
        "peer SQNR dB",
        "fxcomp SQNR dB",
        "MiB float / peer / fxcomp",
    ]
    print(tabulate(rows, headers=headers, disable_numparse=True))


if __name__ == "__main__":
    main()
