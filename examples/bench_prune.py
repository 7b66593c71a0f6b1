"""Channel pruning: fxcomp's prune pass against Torch-Pruning (DepGraph), side by side.

    python examples/bench_prune.py --model resnet50 --model mobilenet_v2 [--ratio 0.5]

Both prune the same random-weight torchvision model (eval mode) at ``--ratio`` of the channels
of every prunable group, ranked by L2 magnitude summed over the group (producer rows and bias,
BatchNorm scale and shift, consumer columns), with the final classifier kept whole and no
global ranking. Torch-Pruning runs ``MetaPruner(MagnitudeImportance(p=2,
group_reduction="sum", normalizer=None, bias=True))`` and ``step()``; fxcomp runs
``fxcomp.compile(model, x, passes=[fxcomp.passes.prune(ratio, importance="l2")])``.

Measured per model:

* parameters and MACs of the original and both pruned models, all counted by
  ``tp.utils.count_ops_and_params`` at 1x3x224x224, and the ratio fxcomp / Torch-Pruning;
* float eager latency at batch 1 and 8 of the three models, timed interleaved (one call of
  each per round, every order in turn, ``--repeats`` rounds after a warm-up round, an A/A
  column (fxcomp's model timed under a second name against itself),
  under ``torch.no_grad``; ``fxcomp.runtime.latency``), medians in ms and the speed-up over the
  original;
* time to build the dependency graph and to prune, from the same model each time,
  interleaved over ``--prune-repeats`` rounds after one warm-up round (medians). For
  Torch-Pruning the graph is the pruner's construction and pruning is ``step()``; for fxcomp
  the graph is ``fxcomp.ir.trace`` plus ``ChannelGraph.build(gm).groups()``, and pruning is the
  whole ``compile`` minus that. ``compile`` deep-copies the model (the caller's model is never
  changed) and Torch-Pruning prunes the model it is given in place, so the table also shows
  the time of a deep copy and the ratio against Torch-Pruning plus that copy: what a user who
  keeps the original model pays with each tool.

Both pruned models are run once and must give the original's output shape. On ResNet-50 the
two keep the same channels. On MobileNetV2 they keep as many, but Torch-Pruning's importance
leaves depthwise convolution weights out of the score (fxcomp counts them as producer rows),
so in a few inverted-residual blocks one or two kept channels differ.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch_pruning as tp
import torchvision
from benchmarks_doc import add_output_options, output
from torch import nn

import fxcomp
from fxcomp.pruning.graph import ChannelGraph
from fxcomp.runtime.latency import median_latency

TOOLS = ("original", "torch-pruning", "fxcomp")


def load(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def classifier(model: nn.Module) -> nn.Linear:
    """The model's final Linear layer: both tools keep its outputs."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def seconds(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[nn.Module, dict]:
    """Torch-Pruning on a deep copy: the pruned model and its copy, graph-build and prune
    seconds (it prunes in place: keeping the original costs the copy)."""
    model, copied = seconds(lambda: copy.deepcopy(model))
    importance = tp.importance.MagnitudeImportance(
        p=2, group_reduction="sum", normalizer=None, bias=True
    )
    pruner, build = seconds(
        lambda: tp.pruner.MetaPruner(
            model,
            x,
            importance=importance,
            pruning_ratio=ratio,
            ignored_layers=[classifier(model)],
            global_pruning=False,
        )
    )
    _, step = seconds(pruner.step)
    return model, {"copy": copied, "graph": build, "prune": step}


def fxcomp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[nn.Module, dict]:
    """fxcomp: the pruned GraphModule, its graph-build and prune seconds (``compile`` and
    ``trace`` copy the model themselves: it is never changed)."""
    passes = [fxcomp.passes.prune(ratio, importance="l2")]
    result, total = seconds(lambda: fxcomp.compile(model, x, passes=passes))
    _, build = seconds(lambda: ChannelGraph.build(fxcomp.trace(model, x)).groups())
    return result.module, {"graph": build, "prune": total - build}


def prune_both(
    model: nn.Module, x: torch.Tensor, ratio: float, repeats: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, float]]]:
    """Both pruned models (from the warm-up round) and median times over ``repeats`` rounds."""
    runs = {"torch-pruning": tp_prune, "fxcomp": fxcomp_prune}
    pruned = {key: fn(model, x, ratio)[0] for key, fn in runs.items()}
    times: dict[str, dict[str, list[float]]] = {key: {} for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            for part, value in fn(model, x, ratio)[1].items():
                times[key].setdefault(part, []).append(value)
    medians = {
        key: {part: statistics.median(values) for part, values in parts.items()}
        for key, parts in times.items()
    }
    return pruned, medians


def check_outputs(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, list[int]]:
    """Run every model once; raise if a pruned one's output shape differs from the original's."""
    with torch.no_grad():
        shapes = {key: list(model(x).shape) for key, model in models.items()}
    for key, shape in shapes.items():
        if shape != shapes["original"]:
            raise RuntimeError(f"{key} gives shape {shape}, the original {shapes['original']}")
    return shapes


def latency_ms(models: dict[str, nn.Module], batch: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each model at ``batch``, and of fxcomp's under a second name, the
    A/A line (``fxcomp.runtime.latency``: one warm-up round, then ``repeats`` rounds going
    through every order of the models in turn)."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    timed = {**models, "fxcomp (A/A)": models["fxcomp"]}
    return {key: ms[0] for key, ms in median_latency(timed, [(x,)], repeats).items()}


def measure(name: str, args: argparse.Namespace) -> dict:
    model = load(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pruned, prune_times = prune_both(model, x, args.ratio, args.prune_repeats)
    models = {"original": model, **pruned}
    shapes = check_outputs(models, x)
    print(f"{name}: output shapes " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    counts = {key: tp.utils.count_ops_and_params(m, x) for key, m in models.items()}
    return {
        "model": name,
        "ratio": args.ratio,
        "macs": {key: int(macs) for key, (macs, _) in counts.items()},
        "params": {key: int(params) for key, (_, params) in counts.items()},
        "latency_ms": {b: latency_ms(models, b, args.repeats) for b in args.batch},
        "prune_s": prune_times,
        "output_shapes": shapes,
    }


def size_row(r: dict) -> list[object]:
    params, macs = r["params"], r["macs"]
    cells = [f"{params[k] / 1e6:.2f}" for k in TOOLS] + [f"{macs[k] / 1e9:.3f}" for k in TOOLS]
    ratios = [f"{d['fxcomp'] / d['torch-pruning']:.4f}" for d in (params, macs)]
    return [r["model"], *cells, *ratios]


def latency_rows(r: dict) -> list[list[object]]:
    rows = []
    for batch, ms in r["latency_ms"].items():
        speedups = [f"{ms['original'] / ms[k]:.2f}x" for k in TOOLS[1:]]
        noise = f"{ms['fxcomp (A/A)'] / ms['fxcomp']:.2f}"
        rows.append([r["model"], batch, *(f"{ms[k]:.2f}" for k in TOOLS), *speedups, noise])
    return rows


def time_row(r: dict) -> list[object]:
    t = r["prune_s"]
    total = {k: t[k]["graph"] + t[k]["prune"] for k in t}
    cells = [f"{t[k][part] * 1e3:.0f}" for k in TOOLS[1:] for part in ("graph", "prune")]
    with_copy = total["torch-pruning"] + t["torch-pruning"]["copy"]
    return [
        r["model"],
        *cells,
        f"{total['fxcomp'] / total['torch-pruning']:.2f}",
        f"{t['torch-pruning']['copy'] * 1e3:.0f}",
        f"{total['fxcomp'] / with_copy:.2f}",
    ]


def tables_of(results: list[dict]) -> list[tuple[list[list[object]], list[str]]]:
    tables = [
        (
            [size_row(r) for r in results],
            [
                "model",
                "params M",
                "TP params M",
                "fxcomp params M",
                "GMACs",
                "TP GMACs",
                "fxcomp GMACs",
                "fxcomp/TP params",
                "fxcomp/TP MACs",
            ],
        ),
        (
            [row for r in results for row in latency_rows(r)],
            [
                *("model", "batch", "float ms", "TP ms", "fxcomp ms"),
                *("TP speed-up", "fxcomp speed-up", "A/A"),
            ],
        ),
        (
            [time_row(r) for r in results],
            [
                "model",
                "TP graph ms",
                "TP prune ms",
                "fxcomp graph ms",
                "fxcomp prune ms",
                "fxcomp/TP total",
                "copy ms",
                "fxcomp/(TP+copy)",
            ],
        ),
    ]
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="torchvision model (repeatable)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", action="append", type=int, help="default: 1 and 8")
    parser.add_argument("--repeats", type=int, default=30, help="latency rounds")
    parser.add_argument("--prune-repeats", type=int, default=5, help="graph/prune rounds")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    add_output_options(parser)
    args = parser.parse_args()
    args.batch = args.batch or [1, 8]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = [measure(name, args) for name in args.model or ["resnet50", "mobilenet_v2"]]
    output("bench_prune", args, tables_of(results), results)


if __name__ == "__main__":
    main()
