"""Training passes under torchrun: two CPU processes (gloo) against one, rank 0 alone
writing, every rank ending with the same model; and how data is shared among ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fxcomp.ir.errors import InputError
from fxcomp.runtime import distributed

SCRIPT = Path(__file__).parent.parent / "examples" / "distributed_training.py"


def _run(command: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it, for both runs
    done = subprocess.run(
        [*command, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return sorted(
        (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
        key=lambda row: row["rank"],
    )


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(tmp_path):
    (single,) = _run([sys.executable], tmp_path / "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    ranks = _run([*torchrun, "--nproc_per_node=2"], tmp_path / "ddp")
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    # the same teacher, the same student on every rank, and its quality as in one process
    assert ranks[0]["float_accuracy"] == single["float_accuracy"]
    assert ranks[0]["outputs_sha256"] == ranks[1]["outputs_sha256"]
    assert ranks[0]["int8_accuracy"] == ranks[1]["int8_accuracy"]
    assert ranks[0]["int8_accuracy"] >= single["int8_accuracy"] - 1.5, (ranks, single)
    assert ranks[0]["int8_accuracy"] >= single["float_accuracy"] - 1.5
    # rank 0 alone wrote, the same files as one process writes
    assert (
        ranks[0]["artifact"] == str(tmp_path / "ddp" / "model.pt") and ranks[1]["artifact"] is None
    )
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert [row["epoch"] for row in report["tables"]["qat"]] == [1, 2]


def test_each_rank_gets_its_share(monkeypatch):
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2)]
    dataset = TensorDataset(x, y)
    # one process: batches as given, a Dataset batched and shuffled by seed and epoch
    assert distributed.shard(batches, epoch=0, seed=0) is batches
    one = [b[1].tolist() for b in distributed.shard(dataset, epoch=1, seed=0, batch_size=4)]
    assert sorted(i for b in one for i in b) == list(range(10))
    assert [len(b) for b in one] == [4, 4, 2]
    again = [b[1].tolist() for b in distributed.shard(dataset, epoch=1, seed=0, batch_size=4)]
    assert again == one
    # rank 1 of 2: every other batch, equal counts; loaders re-made with a DistributedSampler
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert distributed.shard(batches, epoch=0, seed=0) == batches[1::2][:2]
    loader = DataLoader(dataset, batch_size=2, shuffle=True)
    mine = distributed.shard(loader, epoch=3, seed=0)
    assert mine.sampler.rank == 1 and mine.sampler.num_replicas == 2 and mine.sampler.shuffle
    assert mine.sampler.epoch == 3 and len(mine) == 3 and mine.batch_size == 2
    with pytest.raises(InputError, match="cannot shard a generator among 2 processes"):
        distributed.shard((b for b in batches), epoch=0, seed=0)
