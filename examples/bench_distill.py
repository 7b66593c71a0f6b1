"""Distillation's defaults against a tuned recipe, over several teachers.

    python examples/bench_distill.py [--teachers 6]

For each teacher (the digits CNN, width 32, trained from seeds 0, 1, ...): ``prune(0.5)``,
then ``distill`` from the teacher on the training digits in batches of 32, three ways:

* defaults: only the teacher and the data (3 epochs, ``alpha=0.7``, the learning rate from
  a range test);
* recipe: 6 epochs, ``lr=1e-2``, ``alpha=0.5`` (the one ``tests/test_distill.py`` holds);
* fixed ``lr=1e-3``: the defaults with the learning rate the pass used to default to;
* defaults after fuse: ``fuse()`` first, so the student has no BatchNorm left to steady a
  high learning rate (the case the range test's rule must not get wrong).

The table gives the test accuracy of each (450 held-out digits) and its loss against the
teacher's, and the learning rate each run started at.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from benchmarks_doc import add_output_options, output, table

import fxcomp
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.passes import distill, fuse, prune

WAYS = {
    "defaults": {},
    "recipe": {"epochs": 6, "lr": 1e-2, "alpha": 0.5},
    "fixed lr=1e-3": {"lr": 1e-3},
    "defaults after fuse": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", type=int, default=6)
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = load_digits_split()
    rows, losses = [], {way: [] for way in WAYS}
    for seed in range(args.teachers):
        torch.manual_seed(seed)
        teacher = train(DigitsNet(width=32), data, progress=False)
        float_accuracy = accuracy(teacher, data.test_x, data.test_y)
        row: dict[str, object] = {"teacher seed": seed, "float %": f"{float_accuracy:.2f}"}
        for way, options in WAYS.items():
            step = distill(teacher, data.batches(32), progress=False, **options)
            first = [fuse()] if way.endswith("after fuse") else []
            result = fxcomp.compile(teacher, data.test_x[:2], passes=[*first, prune(0.5), step])
            final = accuracy(result.module, data.test_x, data.test_y)
            losses[way].append(float_accuracy - final)
            lr = float(result.report.tables["distill"][0]["lr"])
            row[f"{way} %"] = f"{final:.2f}"
            row[f"{way} lr"] = f"{lr:.3g}"
        rows.append(row)
        print(row, flush=True)
    summary = [
        {
            "way": way,
            "mean loss, points": f"{statistics.mean(values):.2f}",
            "largest loss, points": f"{max(values):.2f}",
        }
        for way, values in losses.items()
    ]
    output("bench_distill", args, [table(rows), table(summary)], {"rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
