"""Prune, distil and quantization-aware-train the digits CNN on several processes.

    torchrun --standalone --nproc_per_node=2 examples/distributed_training.py --out DIR

The same script runs in one process (``python examples/distributed_training.py --out DIR``).
Under torchrun, ``distill`` and ``qat`` train with DistributedDataParallel (gloo), each rank
on its shard of the DataLoader; rank 0 alone writes ``DIR/model.pt`` and
``DIR/report.json``. Every rank prints one JSON line: its rank, the world size, the INT8
model's test accuracy, a digest of its test-set outputs (equal on every rank: gradients,
BatchNorm statistics and observer ranges were kept in step), and the artifact it wrote
(null on the other ranks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import fxcomp
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.passes import distill, fuse, prune, qat
from fxcomp.runtime.distributed import world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (rank 0)")
    parser.add_argument("--width", type=int, default=32, help="DigitsNet width")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    parser.add_argument("--distill-epochs", type=int, default=4)
    parser.add_argument("--qat-epochs", type=int, default=2)
    args = parser.parse_args()

    rank, size = world()
    data = load_digits_split()
    torch.manual_seed(0)  # every rank trains the same teacher
    model = train(DigitsNet(args.width), data, progress=False)
    loader = DataLoader(
        TensorDataset(data.train_x, data.train_y), batch_size=args.batch_size, shuffle=True
    )
    student = distill(model, loader, epochs=args.distill_epochs, lr=1e-2, alpha=0.5)
    passes = [fuse(), prune(0.5), student, qat(loader, epochs=args.qat_epochs, lr=1e-3)]
    result = fxcomp.compile(
        model,
        data.test_x[:1],
        passes,
        backend="torchscript",
        output_dir=args.out,
    )
    with torch.no_grad():
        outputs = result.module(data.test_x).numpy().tobytes()
    artifact = str(result.artifact.path) if result.artifact is not None else None
    figures = {
        "rank": rank,
        "world_size": size,
        "float_accuracy": accuracy(model, data.test_x, data.test_y),
        "int8_accuracy": accuracy(result.module, data.test_x, data.test_y),
        "outputs_sha256": hashlib.sha256(outputs).hexdigest(),
        "artifact": artifact,
    }
    print(json.dumps(figures), flush=True)
    if size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
