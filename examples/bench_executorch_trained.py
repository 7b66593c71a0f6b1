"""INT8 on trained classifiers in ExecuTorch: fxcomp's ``.pte`` against PT2E's, on real data.

    python examples/bench_executorch_trained.py
    python examples/bench_executorch_trained.py --model mobilenet_v3_large --seeds 3
    python examples/bench_executorch_trained.py --learned-rounding

``examples/bench_executorch.py`` compares the two quantizers on random-weight networks fed
with noise, which amplify any perturbation: there a 2% change of one activation grid moves
MobileNetV3's SQNR by up to 0.8 dB, so a figure ranks quantizers by chaos as much as by
their grids. Here the same torchvision architectures (10 classes) are trained on
scikit-learn's digits (``fxcomp.cli.digits.digits_classifier``: the 8 x 8 images upsampled to
64 x 64 over three channels; trained once per machine and cached, a minute or two each on two
cores, about six for resnet50), and measured on the held-out quarter of the digits (450
images).

Per model and calibration seed (``--seeds``): 128 training images drawn with that seed, in
8 batches of 16, calibrate

* pt2e: ``prepare_pt2e`` with ``XNNPACKQuantizer`` and ``get_symmetric_quantization_config(
  is_per_channel=True)``, ``convert_pt2e``, lowered with the XNNPACK partitioner
  (``examples/bench_executorch.py``'s ``int8_programs`` makes all three);
* fxcomp: ``fxcomp.compile(model, x, [fuse(), quantize(calib, engine="xnnpack")],
  backend="executorch")``;
* fxcomp + bias correction: the same with ``quantize(..., bias_correction=True)``;

or, with ``--learned-rounding``, in place of the last:

* fxcomp + learned rounding: ``quantize(..., rounding="learned")`` (``learn_rounding``,
  200 steps on the same 128 images);

all three for batch 1 and run by ExecuTorch's runtime on the 450 images one at a time. The
tables give each program's SQNR in dB against the float model's logits and its top-1
accuracy, their means over the seeds, and fxcomp's gap to PT2E on each seed.
``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
from bench_executorch import VARIANTS, int8_programs, one_by_one
from benchmarks_doc import add_output_options, output
from tqdm import tqdm

from fxcomp.backends.executorch.program import require_executorch
from fxcomp.cli.digits import DigitsData, accuracy, digits_classifier, upsampled_digits
from fxcomp.runtime.parity import sqnr

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large")
LEARNED = "fxcomp + learned rounding"
ROUNDING = {"fxcomp": {}, LEARNED: {"rounding": "learned"}}


def calibration_batches(data: DigitsData, seed: int) -> list[torch.Tensor]:
    """128 training images drawn with ``seed``, in 8 batches of 16."""
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))
    return list(data.train_x[order[:128]].split(16))


def measure(name: str, seeds: int, work: Path, variants: dict) -> dict:
    data = upsampled_digits()
    model = digits_classifier(name)
    with torch.no_grad():
        reference = model(data.test_x)
    by_seed = []
    for seed in tqdm(range(seeds), desc=name, unit="seed"):
        calibration = calibration_batches(data, seed)
        made = int8_programs(model, calibration, work / f"{name}-{seed}", variants)
        outputs = {key: one_by_one(program, data.test_x) for key, program in made.items()}
        by_seed.append(
            {
                key: {
                    "sqnr_db": sqnr(reference, out),
                    "accuracy": float((out.argmax(1) == data.test_y).float().mean()) * 100,
                }
                for key, out in outputs.items()
            }
        )
    return {
        "model": name,
        "float_accuracy": accuracy(model, data.test_x, data.test_y),
        "by_seed": by_seed,
    }


def _mean(result: dict, key: str, figure: str) -> float:
    return statistics.mean(seed[key][figure] for seed in result["by_seed"])


def _gaps(result: dict, key: str) -> list[float]:
    return [seed[key]["sqnr_db"] - seed["pt2e"]["sqnr_db"] for seed in result["by_seed"]]


def tables_of(results: list[dict]) -> list:
    seeds = len(results[0]["by_seed"])
    programs = list(results[0]["by_seed"][0])
    quality = [
        [r["model"], f"{r['float_accuracy']:.2f}"]
        + [f"{_mean(r, key, 'sqnr_db'):.2f}" for key in programs]
        + [f"{_mean(r, key, 'accuracy'):.2f}" for key in programs]
        for r in results
    ]
    quality_headers = ["digits 64x64, trained", "float top-1 %"]
    quality_headers += [f"{key} SQNR dB" for key in programs]
    quality_headers += [f"{key} top-1 %" for key in programs]
    gaps = []
    for r in results:
        row = [r["model"]]
        for key in programs[1:]:
            each = _gaps(r, key)
            row += [f"{statistics.mean(each):+.2f}", " ".join(f"{g:+.2f}" for g in each)]
        gaps.append(row)
    gap_headers = [f"SQNR gap to pt2e over {seeds} calibration seeds"]
    for key in programs[1:]:
        gap_headers += [f"{key}, mean", f"{key}, each seed"]
    return [(quality, quality_headers), (gaps, gap_headers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, help="default: all four")
    parser.add_argument("--seeds", type=int, default=4, help="calibration draws per model")
    parser.add_argument(
        "--learned-rounding",
        action="store_true",
        help="fxcomp + learned rounding in place of bias correction (its own docs section)",
    )
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    require_executorch()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        variants = ROUNDING if args.learned_rounding else VARIANTS
        results = [measure(name, args.seeds, Path(work), variants) for name in args.model or MODELS]
    section = "bench_executorch_trained" + ("_rounding" if args.learned_rounding else "")
    output(section, args, tables_of(results), results)


if __name__ == "__main__":
    main()
