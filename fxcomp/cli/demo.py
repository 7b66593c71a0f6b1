"""The main job on a built-in default: train a CNN on real digits, compress it step by step.

Trains ``DigitsNet`` on scikit-learn's handwritten digits (seconds on a CPU), then compiles
it with one pipeline: ``fuse``, ``prune(0.5)``, ``distill`` from the trained model, and INT8
``quantize`` (or ``qat``, quantization-aware training, with ``qat=True``) to a TorchScript
file. The graph after each step is kept (an ``after_pass`` hook) and every step is measured
side by side as deployed, frozen TorchScript: test accuracy, parameters, serialized size,
and latency (interleaved, medians) at batch 1 and on the whole test set.

Example::

    rows = run_demo(Path("fxcomp-demo"))
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from tabulate import tabulate
from torch import nn

from fxcomp.api.compile import compile
from fxcomp.backends import BACKENDS
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.cli.options import engine_option, observer_option
from fxcomp.passes import distill, fuse, prune, qat, quantize
from fxcomp.quant.lowering import script
from fxcomp.quant.scheme import deprecated_apis
from fxcomp.runtime.latency import median_latency

__all__ = ["DemoRow", "demo", "run_demo"]


@dataclass(frozen=True)
class DemoRow:
    """One step's figures, measured on its TorchScript form."""

    step: str
    accuracy: float
    parameters: int
    kib: float
    batch1_ms: float
    test_set_ms: float


def _frozen(model: nn.Module, x: torch.Tensor) -> tuple[torch.jit.ScriptModule, int]:
    """A float model as frozen TorchScript, loaded back, and its size in bytes."""
    buffer = io.BytesIO()
    with deprecated_apis():
        torch.jit.save(script(model, (x,), "x86"), buffer)
        return torch.jit.load(io.BytesIO(buffer.getvalue())), len(buffer.getvalue())


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(
    output_dir: Path,
    *,
    engine: str = "x86",
    observer: str = "mse",
    qat_epochs: int | None = None,
    width: int = 32,
    ratio: float = 0.5,
    distill_epochs: int = 6,
    rounds: int = 50,
    progress: bool = True,
) -> list[DemoRow]:
    """Train, prune, distil, quantize (or QAT with ``qat_epochs``), emit and measure; the
    INT8 TorchScript lands in ``output_dir``."""
    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(width), data, progress=progress)
    batches = data.batches(64)
    if qat_epochs is None:
        calibration = [x for x, _ in batches]
        last = quantize(calibration, engine=engine, observer=observer, progress=progress)
        int8_step = f"INT8 {engine} ({observer} PTQ)"
    else:
        last = qat(batches, epochs=qat_epochs, lr=3e-4, engine=engine, progress=progress)
        int8_step = f"INT8 {engine} (QAT, {qat_epochs} epochs)"
    kept: dict[str, nn.Module] = {}

    def keep(record, gm, ctx) -> None:
        if record.path in ("prune", "distill"):
            kept[record.path] = copy.deepcopy(gm)

    student = distill(
        model, data.batches(32), epochs=distill_epochs, lr=1e-2, alpha=0.5, progress=progress
    )
    result = compile(
        model,
        data.test_x[:1],
        passes=[fuse(), prune(ratio), student, last],
        backend="torchscript",
        output_dir=output_dir,
        after_pass=[keep],
    )
    steps = {
        "float": model,
        f"pruned {ratio:.0%}": kept["prune"],
        f"distilled ({distill_epochs} epochs)": kept["distill"],
    }
    deployed, sizes, parameters = {}, {}, {}
    for name, module in steps.items():
        deployed[name], sizes[name] = _frozen(module, data.test_x[:1])
        parameters[name] = _parameters(module)
    deployed[int8_step] = BACKENDS["torchscript"].load(result.artifact)
    sizes[int8_step] = result.artifact.path.stat().st_size
    parameters[int8_step] = parameters[f"distilled ({distill_epochs} epochs)"]
    ms = median_latency(deployed, [(data.test_x[:1],), (data.test_x,)], rounds)
    return [
        DemoRow(
            name,
            accuracy(module, data.test_x, data.test_y),
            parameters[name],
            sizes[name] / 1024,
            *ms[name],
        )
        for name, module in deployed.items()
    ]


@click.command()
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fxcomp-demo"),
    show_default=True,
)
@engine_option(kernels_only=True)
@observer_option
@click.option(
    "--qat",
    "qat_epochs",
    type=click.IntRange(min=1),
    default=None,
    help="quantization-aware training for this many epochs instead of calibration",
)
def demo(output_dir: Path, engine: str, observer: str, qat_epochs: int | None) -> None:
    """Train a CNN on real handwritten digits; fuse, prune, distil and quantize it to INT8,
    and compare every step."""
    rows = run_demo(output_dir, engine=engine, observer=observer, qat_epochs=qat_epochs)
    headers = ["step", "test accuracy %", "parameters", "size KiB", "batch 1 ms", "test set ms"]
    body = [
        [
            r.step,
            f"{r.accuracy:.2f}",
            r.parameters,
            f"{r.kib:.1f}",
            f"{r.batch1_ms:.3f}",
            f"{r.test_set_ms:.2f}",
        ]
        for r in rows
    ]
    click.echo(tabulate(body, headers=headers))
    click.echo(f"\nINT8 TorchScript: {output_dir / 'model.pt'}")
