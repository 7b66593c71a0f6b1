"""Dynamic INT8 quantization: fxcomp's ``quantize_dynamic`` against torch.ao's, side by side.

    python examples/bench_dynamic.py [--rounds 200]

Two sequence models trained in seconds on real digits read row by row (scikit-learn's
``load_digits``: 8 rows of 8 pixels per image): ``DigitsLSTM`` and ``DigitsTransformer``.
Each is quantized dynamically by fxcomp (int8 weights per output channel, and per tensor as
the peer does) and by ``torch.ao.quantization.quantize_dynamic`` (its defaults: per-tensor
weights). The peer's quantized Transformer fails in the encoder's fast path
(``AttributeError``), so it runs, and is traced, with that path switched off
(``torch.backends.mha.set_fastpath_enabled(False)`` around each call): layer by layer, as
fxcomp's converted model runs. Every model is timed as a Python module and in its
deployable form, frozen TorchScript (fxcomp's ``backend="torchscript"`` artifact; the
peer's model traced and frozen), all interleaved in this process (``fxcomp.runtime.latency``) at
batch 1 and on the whole test set (450 images); the table gives medians, test accuracy, the
output's cosine similarity to float and the serialized state size. Ratios are against the
peer in the same form (Python or TorchScript).
"""

from __future__ import annotations

import argparse
import copy
import io
import tempfile
import warnings

import torch
import torch.nn.functional as F
from benchmarks_doc import add_output_options, output, table
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.cli.digits import DigitsLSTM, DigitsTransformer, accuracy, load_digits_split, train
from fxcomp.passes import quantize_dynamic
from fxcomp.quant.scheme import deprecated_apis
from fxcomp.runtime.latency import median_latency


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def frozen(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with deprecated_apis(), torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(model, x).eval())


def fxcomp_artifact(model: nn.Module, x: torch.Tensor, passes: list) -> torch.jit.ScriptModule:
    with tempfile.TemporaryDirectory() as out:
        result = fxcomp.compile(model, x, passes=passes, backend="torchscript", output_dir=out)
        return BACKENDS["torchscript"].load(result.artifact.path)


class SlowPath(nn.Module):
    """Runs ``model`` with the Transformer encoder's fast path switched off."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)


def peer(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = ao_quantize_dynamic(copy.deepcopy(model), {nn.Linear, nn.LSTM}, torch.qint8)
    try:
        with torch.no_grad():
            quantized(torch.zeros(1, 1, 8, 8))
    except AttributeError:  # the encoder's fast path cannot take quantized projections
        return SlowPath(quantized)
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    add_output_options(parser)
    args = parser.parse_args()
    data = load_digits_split()
    inputs = [(data.test_x[:1],), (data.test_x,)]
    rows = []
    for make, epochs, lr in ((DigitsLSTM, 20, 0.01), (DigitsTransformer, 12, 0.005)):
        torch.manual_seed(0)
        model = train(make(), data, epochs=epochs, lr=lr, progress=False)
        x = data.test_x[:1]
        theirs = peer(model)
        named = {
            "fxcomp": [quantize_dynamic()],
            "fxcomp per-tensor": [quantize_dynamic(per_channel=False)],
        }
        models = {"float": model}
        models |= {name: fxcomp.compile(model, x, passes=p).module for name, p in named.items()}
        models["torch.ao"] = theirs
        models["float (TorchScript)"] = frozen(model, x)
        for name, passes in named.items():
            models[f"{name} (TorchScript)"] = fxcomp_artifact(model, x, passes)
        models["torch.ao (TorchScript)"] = frozen(theirs, x)
        models["fxcomp (TorchScript, A/A)"] = models["fxcomp (TorchScript)"]  # the noise floor
        ms = median_latency(models, inputs, args.rounds)
        with torch.no_grad():
            reference = model(data.test_x)
            for name, m in models.items():
                peer_name = "torch.ao (TorchScript)" if "TorchScript" in name else "torch.ao"
                base = "float (TorchScript)" if "TorchScript" in name else "float"
                cosine = F.cosine_similarity(reference, m(data.test_x)).min().item()
                state = "-" if "TorchScript" in name else f"{state_bytes(m) / 1024:.1f}"
                rows.append(
                    {
                        "model": make.__name__,
                        "quantized by": name,
                        "accuracy %": f"{accuracy(m, data.test_x, data.test_y):.2f}",
                        "min cosine": f"{cosine:.5f}",
                        "state KiB": state,
                        "batch 1 ms": f"{ms[name][0]:.3f}",
                        "450 ms": f"{ms[name][1]:.2f}",
                        "b1 vs float": f"{ms[name][0] / ms[base][0]:.2f}",
                        "b1 vs ao": f"{ms[name][0] / ms[peer_name][0]:.2f}",
                        "450 vs ao": f"{ms[name][1] / ms[peer_name][1]:.2f}",
                    }
                )
    output("bench_dynamic", args, [table(rows)], rows)


if __name__ == "__main__":
    main()
