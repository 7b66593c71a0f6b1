"""Interleaved timing: the orders models run in, not the times they take (timing belongs in
the benchmarks)."""

from __future__ import annotations

import time
from collections import Counter
from itertools import pairwise

from fxcomp.runtime.latency import (
    SETTLE_S,
    _orders,
    describe_cpu,
    median_latency,
    thread_pool,
    timing_method,
)


def test_rounds_go_through_every_order_so_no_model_always_follows_the_same_one():
    names = ["float", "peer", "ours"]
    orders = _orders(names, 12)
    assert len(set(orders)) == 6  # every permutation, twice
    after = Counter(pair for order in orders for pair in pairwise(order))
    assert set(after) == {(a, b) for a in names for b in names if a != b}
    assert len(set(after.values())) == 1  # each model follows each other equally often
    many = _orders([str(i) for i in range(7)], 20)
    assert len(set(many)) == 20 and all(sorted(o) == sorted(many[0]) for o in many)


def test_median_latency_times_every_model_on_every_input_and_names_the_cpu():
    calls = Counter()

    def model(name):
        return lambda x: calls.update([(name, x)])

    ms = median_latency({"a": model("a"), "b": model("b")}, [(1,), (2,)], rounds=4)
    assert set(ms) == {"a", "b"} and all(len(v) == 2 for v in ms.values())
    assert set(calls.values()) == {5}  # a warm-up round, then 4 timed
    assert "cores)" in describe_cpu()


class _OnPool:
    """A model on a thread pool of its own, recording when it runs."""

    def __init__(self, pool: str, log: list) -> None:
        self.thread_pool, self.log = pool, log

    def __call__(self, x):
        self.log.append((self.thread_pool, time.perf_counter()))


def test_models_on_other_thread_pools_are_kept_apart_by_a_pause_and_an_untimed_call():
    log: list = []
    models = {"torch": lambda x: log.append(("torch", time.perf_counter()))}
    models["openvino"] = _OnPool("openvino", log)
    assert timing_method({"a": models["torch"]}) == "interleaved"
    assert "pause and one untimed call" in timing_method(models)
    assert thread_pool(models["openvino"]) == "openvino" and thread_pool(print) == "torch"
    median_latency(models, [(1,)], rounds=4)
    # 5 rounds of 2 models, in the orders (torch, openvino), (openvino, torch), ...: the pool
    # changes once in each round, and each change brings a pause and one untimed call
    changes = [(a, b) for a, b in pairwise(log) if a[0] != b[0]]
    assert len(changes) == 5 and len(log) == 2 * 5 + 5
    assert all(b[1] - a[1] >= SETTLE_S for a, b in changes)
