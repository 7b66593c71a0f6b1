"""INT8 latency and fidelity: fxcomp's TorchScript against torch.ao's quantize_fx, side by side.

    python examples/bench_quantize.py [--model resnet18 ...] [--batch 1 --batch 8]

Both quantize the same random-weight model (BatchNorm statistics first re-estimated on the
input distribution, as random weights otherwise give degenerate activations) with the same
calibration batches and the x86 engine. The peer is measured in its deployable form:
``prepare_fx``/``convert_fx``, traced to TorchScript and frozen. Float eager is the baseline.
For each batch size every model is loaded fresh and first called with that batch size (the
x86/oneDNN convolution tunes itself to the first shape it sees); then the three are timed
interleaved, and the table gives medians. SQNR is against the float model on held-out inputs.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from benchmarks_doc import add_output_options, output, table
from tabulate import tabulate
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.runtime.parity import sqnr


def prepared_model(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.get_model(name, weights=None), data)


def peer_int8(model: nn.Module, calibration: list[torch.Tensor]) -> bytes:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calibration[0],))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
        converted = convert_fx(prepared)
        scripted = torch.jit.freeze(torch.jit.trace(converted, (calibration[0],)).eval())
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def fxcomp_int8(model: nn.Module, calibration: list[torch.Tensor], out: Path) -> Path:
    passes = [fxcomp.passes.fuse(), fxcomp.passes.quantize(calibration, progress=False)]
    result = fxcomp.compile(model, calibration[0][:1], passes, "torchscript", out)
    return result.artifact.path


def median_ms(fn, x: torch.Tensor, rounds: list[float]) -> None:
    start = time.perf_counter()
    fn(x)
    rounds.append((time.perf_counter() - start) * 1e3)


def measure(name: str, batches: list[int], rounds: int, work: Path) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(6)]
    model = prepared_model(name, data[:4])
    calibration, held_out = data[:4], data[4:]
    peer_bytes = peer_int8(model, calibration)
    ours_path = fxcomp_int8(model, calibration, work / name)
    rows = []
    with torch.no_grad():
        for batch in batches:
            x = held_out[0][:batch]
            peer = torch.jit.load(io.BytesIO(peer_bytes))
            peer(x)  # first call with this shape
            ours = BACKENDS["torchscript"].load(ours_path, input_shapes=[list(x.shape)])
            runs = {"float": model, "quantize_fx": peer, "fxcomp": ours}
            times: dict[str, list[float]] = {key: [] for key in runs}
            for fn in runs.values():
                for _ in range(3):
                    fn(x)
            for _ in range(rounds):
                for key, fn in runs.items():
                    median_ms(fn, x, times[key])
            ms = {key: statistics.median(values) for key, values in times.items()}
            reference = torch.cat([model(h) for h in held_out])
            fidelity = {
                key: sqnr(reference, torch.cat([runs[key](h) for h in held_out]))
                for key in ("quantize_fx", "fxcomp")
            }
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "float ms": f"{ms['float']:.2f}",
                    "quantize_fx ms": f"{ms['quantize_fx']:.2f}",
                    "fxcomp ms": f"{ms['fxcomp']:.2f}",
                    "peer speed-up": f"{ms['float'] / ms['quantize_fx']:.2f}x",
                    "fxcomp speed-up": f"{ms['float'] / ms['fxcomp']:.2f}x",
                    "fxcomp/peer": f"{ms['fxcomp'] / ms['quantize_fx']:.2f}",
                    "peer SQNR dB": f"{fidelity['quantize_fx']:.2f}",
                    "fxcomp SQNR dB": f"{fidelity['fxcomp']:.2f}",
                }
            )
            print(tabulate([rows[-1]], headers="keys"), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append")
    parser.add_argument("--batch", action="append", type=int)
    parser.add_argument("--rounds", type=int, default=30)
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    models = args.model or ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large"]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in models:
            rows += measure(name, args.batch or [1, 8], args.rounds, Path(work))
    output("bench_quantize", args, [table(rows)], rows)


if __name__ == "__main__":
    main()
