"""The models users bring, swept through fxcomp: which capture takes each, and what each pass
does to it, with Torch-Pruning 1.6 as the peer on timm's families.

    python examples/sweep_models.py [--timm N] [--write-docs]

Hugging Face transformers (``fxcomp.cli.zoo.TRANSFORMERS``, small configs): the capture and,
per pass, the cosine similarity of the output to float, or the error that stops it; and
what mixed precision keeps in float (ops, such as residual adds, and layers) to reach 3 dB
more SQNR than all INT8.
timm (``fxcomp.cli.zoo.TIMM``, one model per family under 30M parameters): the capture, the
fused output's error relative to the original, and the share of parameters ``prune(0.3)``
keeps, next to Torch-Pruning's ``MagnitudePruner`` at 0.3 (L2 importance, the classifier
kept as fxcomp keeps the model's outputs); where either keeps everything or fails, why.
Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import warnings

import torch
import torch.nn.functional as F
from benchmarks_doc import add_output_options, output, table
from torch.utils._pytree import tree_leaves

import fxcomp
from fxcomp import passes as p
from fxcomp.cli.zoo import TIMM, TRANSFORMERS, timm_model, transformer
from fxcomp.ir.capture import CAPTURE
from fxcomp.runtime.parity import sqnr


def _why(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"fails: {(lines[0] if lines else type(err).__name__)[:80]}"


def transformers_row(name: str) -> dict[str, str]:
    model, inputs = transformer(name)
    tensors = tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))
    calibration = [tensors, tensors]
    with torch.no_grad():
        expected = tree_leaves(model(**inputs))[0]
    steps = {
        "quantize_dynamic": [p.quantize_dynamic()],
        "quantize": [p.fuse(), p.quantize(calibration, progress=False)],
        "smooth_quant, quantize": [
            p.fuse(),
            p.smooth_quant(calibration),
            p.quantize(calibration, progress=False),
        ],
        "prune(0.3)": [p.prune(0.3)],
        "sparsify(0.3)": [p.sparsify(0.3)],
        "cast_weights": [p.cast_weights()],
        "share_weights(6 bits)": [p.share_weights(bits=6, progress=False)],
    }
    row = {"model": name}
    int8_sqnr = None
    for step, passes in steps.items():
        try:
            result = fxcomp.compile(model, inputs, passes=passes)
            row.setdefault("capture", CAPTURE.get(result.module)["capture"])
            with torch.no_grad():
                actual = tree_leaves(result.module(*tensors))[0]
            similarity = F.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
            row[step] = f"{similarity:.4f}"
            if step == "quantize":
                int8_sqnr = sqnr(expected, actual)
            if step == "prune(0.3)":
                record = result.report.find("prune")
                row[step] += f" ({record.parameters_after / record.parameters_before:.2f} kept)"
        except Exception as err:  # the table says what stopped it
            row[step] = _why(err)
    row[MIXED] = _mixed_precision(model, inputs, calibration, int8_sqnr)
    return row


MIXED = "mixed precision: all INT8 -> target +3 dB (float ops)"


def _mixed_precision(model, inputs, calibration, int8_sqnr: float | None) -> str:
    """What ``quantize(target_sqnr=...)`` keeps in float to gain 3 dB over all INT8."""
    if int8_sqnr is None:
        return "no INT8 graph"
    step = p.quantize(calibration, target_sqnr=int8_sqnr + 3.0, progress=False)
    try:
        result = fxcomp.compile(model, inputs, passes=[p.fuse(), step])
    except Exception as err:
        return _why(err)
    rows = result.report.tables["mixed_precision"]
    chosen = rows[-1]["float layers and ops"].split(", ")
    layers = {name for name, _ in result.module.named_modules()}
    ops = sum(name not in layers for name in chosen)
    return (
        f"{float(rows[0]['sqnr_db']):.1f} -> {float(rows[-1]['sqnr_db']):.1f} dB "
        f"({ops} ops, {len(chosen) - ops} layers)"
    )


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torch_pruning_kept(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Torch-Pruning on ``model``, in a process of its own with 6 GB of memory and two
    minutes (on some families its dependency graph grows without bound)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        try:
            return pool.apply_async(_torch_pruning, (model, x)).get(timeout=120)
        except multiprocessing.TimeoutError:
            return "fails: over two minutes"


def _torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> str:
    import resource

    import torch_pruning as tp

    warnings.filterwarnings("ignore")  # a fresh process: main's filter does not reach it
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
    model = copy.deepcopy(model)
    before = _parameters(model)
    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.3,
            ignored_layers=[model.get_classifier()],
        )
        pruner.step()
        with torch.no_grad():
            model(x)
    except (Exception, MemoryError) as err:
        return _why(err)
    return f"{_parameters(model) / before:.2f}"


def timm_row(name: str) -> dict[str, str]:
    model = timm_model(name)
    x = torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    row = {"model": name}
    try:
        with torch.no_grad():
            expected = model(x)
            fused = fxcomp.compile(model, x, passes=[p.fuse()])
            error = (fused.module(x) - expected).abs().max() / expected.abs().max()
        row["capture"] = CAPTURE.get(fused.module)["capture"]
        row["fuse: error"] = f"{error:.1e}"
        pruned = fxcomp.compile(model, x, passes=[p.prune(0.3)]).report.find("prune")
        row["fxcomp prune(0.3) kept"] = f"{pruned.parameters_after / pruned.parameters_before:.2f}"
    except Exception as err:
        row.setdefault("capture", "-")
        row["fuse: error"] = row.get("fuse: error", _why(err))
        row.setdefault("fxcomp prune(0.3) kept", _why(err))
    row["Torch-Pruning 0.3 kept"] = torch_pruning_kept(model, x)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", type=int, default=len(TIMM), help="how many timm families")
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    hf = [transformers_row(name) for name in TRANSFORMERS]
    families = []
    for name in TIMM[: args.timm]:
        families.append(timm_row(name))
        print(families[-1], flush=True)
    numbers = {"transformers": hf, "timm": families}
    output("sweep_models", args, [table(hf)], numbers)
    if families:  # --timm 0 leaves the timm section of the docs as it is
        output("sweep_timm", args, [table(families)], numbers)


if __name__ == "__main__":
    main()
