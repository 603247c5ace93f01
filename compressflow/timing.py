"""One way to time models, shared by the engine, the plugins and every benchmark.

A latency figure a user can trust compares like with like: the model under test and the
model it is compared to are timed *interleaved*, round by round, in one window, so that a
burst of load from another process, CPU frequency drift or a cache going cold hits both
alike. Each round times every call once (``number`` calls in a row, reported per call);
the order alternates every round (A B, B A, A B, ...) so that neither call always runs first.
Figures are reported as the median with its interquartile range (:class:`Spread`), and a
speedup is the spread of the *per-round* ratios (base ms / other ms in the same round), which
cancels what the two shared in that round.

    timings = time_models({"input": model, "stage": compressed}, example, rounds=40)
    timings.spread("stage").median               # ms per call
    timings.speedup("input", "stage")            # Spread of per-round ratios; > 1: stage is faster

Only the standard library is imported here; torch is imported when a window is timed.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

__all__ = ["Spread", "Timings", "time_interleaved", "time_models"]


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of a sample."""

    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        """Interquartile range, ``q3 - q1``."""
        return self.q3 - self.q1

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies within the interquartile range (``q1 <= value <= q3``)."""
        return self.q1 <= value <= self.q3

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The median and quartiles of ``values`` (``statistics.quantiles``, inclusive method;
        one value: all three equal it)."""
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Spread.of needs at least one value")
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3)

    def __str__(self) -> str:
        return f"{self.median:.4g} (IQR {self.q1:.4g}-{self.q3:.4g})"


@dataclass(frozen=True)
class Timings:
    """Per-call wall times in ms from one interleaved window."""

    samples: dict[str, list[float]]  # name -> ms per round, in round order

    @property
    def names(self) -> list[str]:
        """The timed names, in the order they were given."""
        return list(self.samples)

    def spread(self, name: str) -> Spread:
        """Median and quartiles of ``name``'s ms per call over the rounds."""
        return Spread.of(self.samples[name])

    def ratios(self, base: str, other: str) -> list[float]:
        """Per-round ``base_ms / other_ms``, in round order."""
        return [_ratio(b, o) for b, o in zip(self.samples[base], self.samples[other], strict=True)]

    def speedup(self, base: str, other: str) -> Spread:
        """Spread of the per-round ratios ``base_ms / other_ms`` (above 1: ``other`` is faster)."""
        return Spread.of(self.ratios(base, other))


def _ratio(base: float, other: float) -> float:
    if other > 0:
        return base / other
    return math.inf if base > 0 else 1.0  # a clock too coarse for the call


def time_interleaved(calls: Mapping[str, Callable[[], object]], *, rounds: int = 30,
                     warmup: int = 5, threads: int | None = 1, number: int = 1) -> Timings:
    """Warm every call up, then time them round by round in one window; the order alternates
    every round (ABBA...) so neither call always runs first.

    ``warmup``: untimed calls of each, interleaved like the rounds. ``number``: calls per
    timing (ms reported per call). ``threads``: torch threads during the window (restored
    after, also when a call raises); None leaves them. The calls run under
    ``torch.inference_mode()``, and the garbage collector is paused while they are timed (as
    ``timeit`` does). A call that raises ends the window; the exception propagates.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if number < 1:
        raise ValueError(f"number must be >= 1, got {number}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if not calls:
        raise ValueError("nothing to time: calls is empty")
    import torch

    names = list(calls)
    order = [(name, calls[name]) for name in names]
    backward = order[::-1]
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    previous_threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            for index in range(warmup):
                for _, call in (order if index % 2 == 0 else backward):
                    call()
            gc.collect()
            gc.disable()
            for index in range(rounds):
                for name, call in (order if index % 2 == 0 else backward):
                    start = clock()
                    for _ in range(number):
                        call()
                    elapsed = clock() - start
                    samples[name].append(elapsed / number / 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
        if threads is not None:
            torch.set_num_threads(previous_threads)
    return Timings(samples)


def _default_feed(model: Callable, inputs: object) -> object:
    return model(inputs)


def time_models(models: Mapping[str, Callable], inputs: Mapping[str, object] | object,
                feed: Callable[[Callable, object], object] | None = None, **kw) -> Timings:
    """Convenience: times ``feed(model, inputs)`` for each model (default feed:
    ``model(inputs)``) with :func:`time_interleaved` (``kw`` goes to it).

    ``eval()`` is called on nn.Modules. ``inputs`` may be one object for all, or a mapping
    name -> inputs: a mapping whose keys include every model's name is read as the latter.
    """
    from torch import nn

    feed = feed or _default_feed
    per_model = isinstance(inputs, Mapping) and all(name in inputs for name in models)
    calls = {}
    for name, model in models.items():
        if isinstance(model, nn.Module):
            model.eval()
        calls[name] = functools.partial(feed, model, inputs[name] if per_model else inputs)
    return time_interleaved(calls, **kw)
