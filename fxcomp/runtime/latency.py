"""Latency side by side: models timed interleaved in one process, medians of many rounds.

Timings on shared machines are noisy, so each round runs every model once on each input,
and the median of the rounds is reported; compare models by their ratio, measured in the
same call, next to an A/A line (one model timed under two names) for the noise floor.
Within a round the models take turns on one input before the next input, and the rounds go
through every order of the models in turn: a model that always ran right after another's
large batch would pay for that batch's effect on the caches and clocks (rotating one order
keeps who follows whom).

Runtimes with thread pools of their own (OpenVINO, ONNX Runtime, ExecuTorch: a callable
says so by a ``thread_pool`` attribute; PyTorch's OpenMP pool is the default) must not run
right after another pool's work: threads still spinning from the last call compete for the
same cores. When the models use more than one pool, each call that follows another pool's
is preceded by a pause of ``SETTLE_S`` and one untimed call (``timing_method`` says which
way a set of models is timed, for the table).

Example::

    ms = median_latency({"float": model, "int8": int8}, [(x,)], rounds=50)
    ms["int8"][0] / ms["float"][0]
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["SETTLE_S", "describe_cpu", "median_latency", "thread_pool", "timing_method"]

SETTLE_S = 0.02  # long enough for a pool's spinning threads to go to sleep

# the instructions that decide which int8 kernels a CPU runs, as torch reports them
_INT8_FEATURES = (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX"))


def describe_cpu() -> str:
    """The CPU's model name and its int8 dot-product instructions (every timing depends on
    them: without VNNI the int8 kernels saturate or take 7-bit ranges).

    Example::

        describe_cpu()   # 'Intel(R) Xeon(R) Processor (AVX-512 VNNI, AMX, 2 cores)'
    """
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    caps = torch.cpu.get_capabilities()
    found = [label for key, label in _INT8_FEATURES if caps.get(key)]
    if not found:
        found = ["AVX2, no VNNI"] if caps.get("avx2") else ["no AVX2"]
    return f"{name} ({', '.join(found)}, {os.cpu_count()} cores)"


def _orders(names: list[str], count: int) -> list[tuple[str, ...]]:
    """``count`` orders of ``names``: every permutation in turn, or seeded shuffles."""
    if len(names) <= 5:
        every = list(itertools.permutations(names))
        return [every[i % len(every)] for i in range(count)]
    shuffler = random.Random(0)
    return [tuple(shuffler.sample(names, len(names))) for _ in range(count)]


def thread_pool(model: Callable[..., Any]) -> str:
    """The thread pool ``model`` runs on: its ``thread_pool`` attribute, else PyTorch's."""
    return getattr(model, "thread_pool", None) or "torch"


def timing_method(models: Mapping[str, Callable[..., Any]]) -> str:
    """How ``median_latency`` times these models: interleaved call by call, or, when they
    use more than one thread pool, with a pause and an untimed call at each change of pool.
    """
    pools = {thread_pool(model) for model in models.values()}
    if len(pools) == 1:
        return "interleaved"
    return f"interleaved; {SETTLE_S * 1e3:.0f} ms pause and one untimed call at each change of pool"


def median_latency(
    models: Mapping[str, Callable[..., Any]], inputs: Sequence[tuple[Any, ...]], rounds: int
) -> dict[str, list[float]]:
    """Median milliseconds of each model on each input tuple, over ``rounds`` interleaved
    rounds (one warm-up round first). Round ``r`` runs the models in the ``r``-th of all
    their orders (a seeded shuffle when there are more than five models), so that no model
    always follows the same one; models on different thread pools are kept apart (module
    docstring)."""
    times: dict[str, list[list[float]]] = {name: [[] for _ in inputs] for name in models}
    orders = _orders(list(models), rounds + 1)
    pools = {name: thread_pool(model) for name, model in models.items()}
    last = None
    with torch.no_grad():
        for round_, order in enumerate(orders):
            for i, args in enumerate(inputs):
                for name in order:
                    if last is not None and pools[name] != last:
                        time.sleep(SETTLE_S)
                        models[name](*args)
                    last = pools[name]
                    start = time.perf_counter()
                    models[name](*args)
                    if round_:
                        times[name][i].append((time.perf_counter() - start) * 1e3)
    return {name: [statistics.median(t) for t in per] for name, per in times.items()}
