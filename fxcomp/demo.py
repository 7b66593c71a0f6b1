"""The main job on a built-in default: train a CNN on real digits, compress it, compare.

Trains ``DigitsNet`` on scikit-learn's handwritten digits (seconds on a CPU), compiles it
with ``fuse`` and INT8 ``quantize`` to a TorchScript file, and measures the float model and
the INT8 artifact side by side: test accuracy, serialized size, and latency (interleaved,
medians) at batch 1 and on the whole test set.

Example::

    rows = run_demo(Path("fxcomp-demo"))
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxcomp.backends import torchscript
from fxcomp.compiler import compile
from fxcomp.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.passes import fuse, quantize
from fxcomp.quant.scheme import deprecated_apis

__all__ = ["DemoRow", "run_demo"]


@dataclass(frozen=True)
class DemoRow:
    """One model's figures."""

    model: str
    accuracy: float
    kib: float
    batch1_ms: float
    test_set_ms: float


def _latency(models: dict, inputs: list[torch.Tensor], rounds: int) -> dict[str, list[float]]:
    times = {name: [[] for _ in inputs] for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                for i, x in enumerate(inputs):
                    start = time.perf_counter()
                    model(x)
                    times[name][i].append((time.perf_counter() - start) * 1e3)
    return {name: [statistics.median(t) for t in per] for name, per in times.items()}


def run_demo(
    output_dir: Path,
    *,
    engine: str = "x86",
    observer: str = "mse",
    rounds: int = 50,
    progress: bool = True,
) -> list[DemoRow]:
    """Train, quantize, emit and measure; the INT8 TorchScript lands in ``output_dir``."""
    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=progress)
    calibration = [x for x, _ in data.batches()]
    result = compile(
        model,
        data.test_x[:1],
        passes=[fuse(), quantize(calibration, engine=engine, observer=observer, progress=progress)],
        backend="torchscript",
        output_dir=output_dir,
    )
    int8 = torchscript.load(result.artifact.path)
    float_ts = io.BytesIO()
    with deprecated_apis():
        torch.jit.save(torch.jit.trace(model, data.test_x[:1]), float_ts)
    ms = _latency({"float": model, "int8": int8}, [data.test_x[:1], data.test_x], rounds)
    return [
        DemoRow(
            "float (eager)",
            accuracy(model, data.test_x, data.test_y),
            len(float_ts.getvalue()) / 1024,
            *ms["float"],
        ),
        DemoRow(
            f"INT8 {engine} ({observer})",
            accuracy(int8, data.test_x, data.test_y),
            result.artifact.path.stat().st_size / 1024,
            *ms["int8"],
        ),
    ]
