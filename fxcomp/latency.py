"""Latency side by side: models timed interleaved in one process, medians of many rounds.

Timings on shared machines are noisy, so each round runs every model once on each input,
and the median of the rounds is reported; compare models by their ratio, measured in the
same call. Within a round the models take turns on one input before the next input, and
their order rotates from round to round: a model that always ran right after another's
large batch would pay for that batch's effect on the caches and clocks.

Example::

    ms = median_latency({"float": model, "int8": int8}, [(x,)], rounds=50)
    ms["int8"][0] / ms["float"][0]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["artifact_runner", "median_latency"]


def median_latency(
    models: Mapping[str, Callable[..., Any]], inputs: Sequence[tuple[Any, ...]], rounds: int
) -> dict[str, list[float]]:
    """Median milliseconds of each model on each input tuple, over ``rounds`` interleaved
    rounds (one warm-up round first)."""
    times: dict[str, list[list[float]]] = {name: [[] for _ in inputs] for name in models}
    names = list(models)
    with torch.no_grad():
        for round_ in range(rounds + 1):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for i, args in enumerate(inputs):
                for name in order:
                    start = time.perf_counter()
                    models[name](*args)
                    if round_:
                        times[name][i].append((time.perf_counter() - start) * 1e3)
    return {name: [statistics.median(t) for t in per] for name, per in times.items()}


def artifact_runner(backend: str, path: Path) -> Callable[..., Any]:
    """A callable that runs the artifact a backend wrote (an ONNX Runtime session is wrapped
    to take tensors)."""
    from fxcomp.backends import BACKENDS

    loaded = BACKENDS[backend].load(path)
    if not callable(loaded):
        names = [i.name for i in loaded.get_inputs()]

        def run(*args: torch.Tensor) -> Any:
            return loaded.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})

        return run
    return loaded
