"""Running under ``torchrun``: the process group, each rank's share of the data, and the
collective steps that keep buffers equal across ranks.

Under ``torchrun --nproc_per_node=N`` the training passes join the process group torchrun
describes (``gloo``: fxcomp trains on the CPU) unless the script already made one, shard
their data by rank, wrap the training step in ``DistributedDataParallel``, and average
buffers once per epoch; ``compile`` writes files on rank 0 only. In a single process every
function here is the identity.

Example::

    rank, size = world()
    batches = shard(loader, epoch=0, seed=0)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from fxcomp.ir.errors import InputError

__all__ = ["all_reduce_", "average_buffers", "is_main_process", "shard", "world"]


def world() -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group on first use when there is one.

    Example::

        rank, size = world()   # (0, 1) in a single process
    """
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return 0, 1
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Whether this process is the one that writes files (rank 0, or the only process)."""
    return world()[0] == 0


def all_reduce_(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks by ``op`` (``sum``, ``mean``, ``min``, ``max``).

    Example::

        all_reduce_(observer.lo, "min")
    """
    _, size = world()
    if size == 1:
        return tensor
    ops = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}
    if tensor.dtype in (torch.int64, torch.int32) and op == "mean":
        raise InputError(f"cannot average an integer buffer of dtype {tensor.dtype}")
    dist.all_reduce(tensor, getattr(dist.ReduceOp, ops[op]))
    if op == "mean":
        tensor.div_(size)
    return tensor


def average_buffers(module: nn.Module) -> None:
    """Make every rank's buffers equal: BatchNorm statistics averaged, and modules with an
    ``all_reduce_`` method (observers) reduced by their own rule.

    Example::

        average_buffers(gm)   # after each epoch of DDP training
    """
    if world()[1] == 1:
        return
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "all_reduce_"):
                m.all_reduce_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                all_reduce_(m.running_mean, "mean")
                all_reduce_(m.running_var, "mean")
                all_reduce_(m.num_batches_tracked, "max")


def shard(data: Iterable[Any], *, epoch: int, seed: int, batch_size: int = 64) -> Iterable[Any]:
    """This rank's batches for ``epoch``.

    A ``DataLoader`` is re-made with a ``DistributedSampler`` (shuffled if it shuffled); a
    map-style ``Dataset`` is batched by ``batch_size``, shuffled by ``seed`` and ``epoch``; a
    list of batches is dealt out by rank, every rank getting the same number (at most N-1
    batches are left out). In a single process, a ``Dataset`` is batched and anything else
    returned as it is.

    Example::

        for batch in shard(train_loader, epoch=epoch, seed=0): ...
    """
    rank, size = world()
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        generator = torch.Generator().manual_seed(seed + epoch)
        sampler = (
            DistributedSampler(data, size, rank, seed=seed)
            if size > 1
            else RandomSampler(data, generator=generator)
        )
        if size > 1:
            sampler.set_epoch(epoch)
        return DataLoader(data, batch_size=batch_size, sampler=sampler)
    if size == 1:
        return data
    if isinstance(data, DataLoader):
        return _sharded_loader(data, rank, size, epoch, seed)
    if isinstance(data, (list, tuple)):
        per_rank = len(data) // size
        if not per_rank:
            raise InputError(f"{len(data)} batches cannot be shared among {size} processes")
        return list(data[rank::size][:per_rank])
    raise InputError(
        f"cannot shard a {type(data).__name__} among {size} processes",
        hint="give a list of batches, a map-style Dataset or a DataLoader",
    )


def _sharded_loader(loader: DataLoader, rank: int, size: int, epoch: int, seed: int) -> DataLoader:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
        return loader
    if loader.batch_size is None or not hasattr(loader.dataset, "__len__"):
        raise InputError(
            "cannot shard a DataLoader over an iterable dataset or with a batch sampler",
            hint="give it a DistributedSampler yourself",
        )
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(
        loader.dataset, size, rank, shuffle=shuffle, seed=seed, drop_last=loader.drop_last
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
    )
