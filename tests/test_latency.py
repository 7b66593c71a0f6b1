"""Interleaved timing: the orders models run in, not the times they take (timing belongs in
the benchmarks)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from fxcomp.runtime.latency import _orders, describe_cpu, median_latency


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
