"""Time to trace and fuse a model: fxcomp against torch.ao's ``fuse_fx``, side by side.

    python examples/bench_fuse.py [--model resnet50] [--repeats 21]

Both run in this process on the same model, interleaved (fxcomp, peer, fxcomp, ...), after
one warm-up each; the table gives medians and the ratio fxcomp / peer (below 1 is faster).
fxcomp's time covers everything ``fxcomp.compile`` does: deep copy, trace, shape
propagation with one forward pass, and the fuse pass with its checks.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision
from benchmarks_doc import add_output_options, output

import fxcomp


def _peer_fuse(model: torch.nn.Module, x: torch.Tensor) -> None:
    from torch.ao.quantization.quantize_fx import fuse_fx

    fuse_fx(model)


def _fxcomp_fuse(model: torch.nn.Module, x: torch.Tensor) -> None:
    fxcomp.compile(model, x, passes=[fxcomp.passes.fuse()])


def measure(name: str, repeats: int) -> list[object]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    runs = {"fxcomp": _fxcomp_fuse, "fuse_fx": _peer_fuse}
    times: dict[str, list[float]] = {key: [] for key in runs}
    for fn in runs.values():
        fn(model, x)  # warm-up
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn(model, x)
            times[key].append(time.perf_counter() - start)
    ours, peer = statistics.median(times["fxcomp"]), statistics.median(times["fuse_fx"])
    return [name, f"{ours * 1e3:.0f}", f"{peer * 1e3:.0f}", f"{ours / peer:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="torchvision model (repeatable)")
    parser.add_argument("--repeats", type=int, default=21)
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = [measure(name, args.repeats) for name in args.model or ["resnet50"]]
    headers = ["model", "fxcomp ms", "fuse_fx ms", "ratio"]
    output("bench_fuse", args, [(rows, headers)], rows)


if __name__ == "__main__":
    main()
