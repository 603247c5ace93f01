"""compressflow.timing: calls are timed interleaved round by round, the order alternating;
figures are medians with quartiles, speedups per-round ratios. Behaviour and correctness only:
no test here asserts an absolute wall-clock value."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from compressflow.timing import Spread, Timings, time_interleaved, time_models


def test_spread_of_hand_made_values():
    odd = Spread.of([5, 1, 4, 2, 3])
    assert (odd.median, odd.q1, odd.q3) == (3, 2, 4)
    even = Spread.of([4, 1, 3, 2])  # inclusive quantiles: (n - 1) * p, interpolated
    assert (even.median, even.q1, even.q3) == (2.5, 1.75, 3.25)
    assert even.iqr == 1.5
    assert even.contains(1.75) and even.contains(3.25) and even.contains(2.0)
    assert not even.contains(1.7) and not even.contains(3.3)
    one = Spread.of([7.0])
    assert (one.median, one.q1, one.q3) == (7.0, 7.0, 7.0) and one.iqr == 0 and one.contains(7.0)
    with pytest.raises(ValueError):
        Spread.of([])


def test_speedup_is_the_spread_of_per_round_ratios():
    timings = Timings({"base": [1.0, 10.0, 100.0], "other": [1.0, 5.0, 100.0]})
    # per round: 1, 2, 1 -> median 1 (the ratio of the medians would be 10 / 5 = 2)
    assert timings.ratios("base", "other") == [1.0, 2.0, 1.0]
    speedup = timings.speedup("base", "other")
    assert (speedup.median, speedup.q1, speedup.q3) == (1.0, 1.0, 1.5)
    assert timings.speedup("other", "base").median == 1.0
    assert timings.spread("base") == Spread(10.0, 5.5, 55.0)
    assert timings.names == ["base", "other"]


def test_order_alternates_and_every_call_is_counted():
    log: list[str] = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("A", "B", "C")}
    timings = time_interleaved(calls, rounds=4, warmup=2, number=3)
    warm, timed = log[:6], log[6:]
    assert warm == list("ABC") + list("CBA")  # warm-up: `warmup` calls of each, interleaved too
    forward, backward = ["A"] * 3 + ["B"] * 3 + ["C"] * 3, ["C"] * 3 + ["B"] * 3 + ["A"] * 3
    assert timed == forward + backward + forward + backward  # ABC CBA ABC CBA, 3 calls a timing
    for name in calls:
        assert log.count(name) == 2 + 4 * 3
    assert timings.names == ["A", "B", "C"]
    assert all(len(timings.samples[n]) == 4 and min(timings.samples[n]) >= 0 for n in calls)


def test_names_keep_the_given_order_and_one_round_works():
    timings = time_interleaved({"z": lambda: None, "a": lambda: None}, rounds=1, warmup=0)
    assert timings.names == ["z", "a"] and [len(v) for v in timings.samples.values()] == [1, 1]


def test_ms_per_call_from_perf_counter_ns(monkeypatch):
    """With a fake clock each call advances by a known amount: ms per call, divided by number."""
    now = [0]
    monkeypatch.setattr(time, "perf_counter_ns", lambda: now[0])

    def cost(ns):
        def call():
            now[0] += ns
        return call

    timings = time_interleaved({"slow": cost(2_000_000), "fast": cost(500_000)},
                               rounds=5, warmup=1, number=4)
    assert timings.samples == {"slow": [2.0] * 5, "fast": [0.5] * 5}
    assert timings.speedup("slow", "fast") == Spread(4.0, 4.0, 4.0)


def test_bad_arguments_are_refused():
    for kw in ({"rounds": 0}, {"warmup": -1}, {"number": 0}, {"threads": 0}):
        with pytest.raises(ValueError):
            time_interleaved({"a": lambda: None}, **kw)
    with pytest.raises(ValueError):
        time_interleaved({})


def test_threads_are_set_then_restored_even_when_a_call_raises():
    seen = []

    def call():
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        if len(seen) == 3:
            raise RuntimeError("boom")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            time_interleaved({"a": call}, rounds=5, warmup=1, threads=1)
        assert torch.get_num_threads() == 2
        assert seen == [(1, True)] * 3
        seen.clear()
        time_interleaved({"a": call, "b": lambda: None}, rounds=1, warmup=0, threads=None)
        assert seen == [(2, True)] and torch.get_num_threads() == 2  # None: left as they are
    finally:
        torch.set_num_threads(before)


def test_time_models_evals_modules_and_takes_inputs_per_model():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2).train(), nn.Linear(3, 2).train()
    fed = []
    timings = time_models({"a": a, "b": b}, {"a": torch.randn(1, 4), "b": torch.randn(1, 3)},
                          rounds=2, warmup=1)
    assert not a.training and not b.training and timings.names == ["a", "b"]
    time_models({"a": a, "b": a}, torch.randn(2, 4), rounds=2, warmup=0,
                feed=lambda model, x: fed.append((model, x.shape)))
    assert fed == [(a, (2, 4))] * 4


def _mlp(hidden: list[int]) -> nn.Module:
    widths = [64, *hidden, 10]
    layers: list[nn.Module] = []
    for i, o in zip(widths, widths[1:]):
        layers += [nn.Linear(i, o), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_an_unchanged_model_comes_out_at_one_within_the_spread():
    """The point of interleaving: a model timed against an unchanged copy of itself is 1.0x
    within the interquartile range of the per-round ratios, even on a loaded machine.

    100 rounds, not 40: even with perfectly fair noise the IQR misses 1.0 when 3/4 of the
    rounds fall on one side, which at 40 rounds happens 0.2% of the time (binomial; 2 of 1000
    runs here), at 100 rounds about once in a million (0 of 1000 runs here)."""
    torch.manual_seed(0)
    model = _mlp([300, 100])
    example = torch.randn(64, 64)
    timings = time_models({"input": model, "stage": copy.deepcopy(model)}, example, rounds=100)
    speedup = timings.speedup("input", "stage")
    assert speedup.contains(1.0), (speedup, timings.samples)


def test_a_model_doing_far_more_work_is_slower_across_its_whole_spread():
    torch.manual_seed(0)
    light, heavy = _mlp([300, 100]), _mlp([6000, 100])  # about 20x the MACs
    example = torch.randn(64, 64)
    timings = time_models({"light": light, "heavy": heavy}, example, rounds=15, warmup=2)
    speedup = timings.speedup("light", "heavy")
    assert speedup.q3 < 1, (speedup, timings.samples)
    assert timings.speedup("heavy", "light").q1 > 1
