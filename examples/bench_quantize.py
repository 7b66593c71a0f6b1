"""INT8 latency and fidelity: fxcomp's TorchScript against torch.ao's quantize_fx, side by side.

    python examples/bench_quantize.py [--model resnet18 --model timm:efficientnet_b0 ...]
        [--batch 1 --batch 8] [--rounds 48]

Both quantize the same random-weight model (a torchvision name, or ``timm:NAME``;
BatchNorm statistics first re-estimated on the input distribution, as random weights
otherwise give degenerate activations) with the same calibration batches and the x86
engine. The peer is measured in its deployable form: ``prepare_fx``/``convert_fx``, traced
to TorchScript and frozen (where it cannot take a model, its cells say so). Float eager is
the baseline. For each batch size every artifact is loaded fresh and first called with that
batch size (the x86/oneDNN convolution tunes itself to the first shape it sees); then all
are timed by ``fxcomp.runtime.latency.median_latency``: interleaved, every order of the
models in turn, medians. The A/A column is fxcomp's artifact timed under a second name
against itself: the noise floor of every ratio in its row. ``int8 convs`` counts the
convolutions fxcomp's artifact runs quantized, of all the float model's. SQNR is against
the float model on held-out inputs.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision
from benchmarks_doc import add_output_options, output, table
from tabulate import tabulate
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.cli.model_spec import load_model
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.runtime.latency import median_latency
from fxcomp.runtime.parity import sqnr

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prepared_model(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = load_model(name) if ":" in name else torchvision.models.get_model(name, weights=None)
    return reestimate_batchnorm(model, data)


def peer_or_reason(model: nn.Module, calibration: list[torch.Tensor]) -> bytes | str:
    """The peer's artifact, or why it could not make one."""
    try:
        return peer_int8(model, calibration)
    except Exception as err:  # any failure of the peer is a table cell
        return f"fails: {type(err).__name__}"


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


def fxcomp_int8(model: nn.Module, calibration: list[torch.Tensor], out: Path) -> tuple[Path, str]:
    """The artifact's path, and how many of the float model's convolutions it quantized."""
    passes = [fxcomp.passes.fuse(), fxcomp.passes.quantize(calibration, progress=False)]
    result = fxcomp.compile(model, calibration[0][:1], passes, "torchscript", out)
    total = sum(isinstance(m, _CONVS) for m in model.modules())
    left = sum(type(m) in _CONVS for m in result.module.modules())
    return result.artifact.path, f"{total - left}/{total}"


def measure(name: str, batches: list[int], rounds: int, work: Path) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(6)]
    model = prepared_model(name, data[:4])
    calibration, held_out = data[:4], data[4:]
    peer_bytes = peer_or_reason(model, calibration)
    ours_path, int8_convs = fxcomp_int8(model, calibration, work / name.replace(":", "_"))
    rows = []
    with torch.no_grad():
        reference = torch.cat([model(h) for h in held_out])
        for batch in batches:
            x = held_out[0][:batch]
            ours = BACKENDS["torchscript"].load(ours_path, input_shapes=[list(x.shape)])
            runs = {"float": model, "fxcomp": ours, "fxcomp (A/A)": ours}
            if isinstance(peer_bytes, bytes):
                runs["quantize_fx"] = torch.jit.load(io.BytesIO(peer_bytes))
            for fn in runs.values():
                fn(x)  # first call with this shape
            ms = {key: values[0] for key, values in median_latency(runs, [(x,)], rounds).items()}
            fidelity = {
                key: f"{sqnr(reference, torch.cat([runs[key](h) for h in held_out])):.2f}"
                for key in ("quantize_fx", "fxcomp")
                if key in runs
            }
            peer = ms.get("quantize_fx")
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "float ms": f"{ms['float']:.2f}",
                    "quantize_fx ms": f"{peer:.2f}" if peer else peer_bytes,
                    "fxcomp ms": f"{ms['fxcomp']:.2f}",
                    "fxcomp speed-up": f"{ms['float'] / ms['fxcomp']:.2f}x",
                    "fxcomp / peer": f"{ms['fxcomp'] / peer:.2f}" if peer else "-",
                    "A/A": f"{ms['fxcomp (A/A)'] / ms['fxcomp']:.2f}",
                    "int8 convs": int8_convs,
                    "peer SQNR dB": fidelity.get("quantize_fx", "-"),
                    "fxcomp SQNR dB": fidelity["fxcomp"],
                }
            )
            print(tabulate([rows[-1]], headers="keys"), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append")
    parser.add_argument("--batch", action="append", type=int)
    parser.add_argument("--rounds", type=int, default=48, help="2 passes over the 24 orders")
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    models = args.model or [
        *("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large"),
        *("timm:efficientnet_b0", "timm:mobilenetv3_large_100", "timm:regnety_002"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in models:
            rows += measure(name, args.batch or [1, 8], args.rounds, Path(work))
    output("bench_quantize", args, [table(rows)], rows)


if __name__ == "__main__":
    main()
