"""Every figure of a stage's model: its task metrics, what it weighs, and how fast it runs.

Evaluation goes through the task (and the registered extra metrics it names). Latency is
timed by :func:`compressflow.timing.time_models`, the stage's model interleaved round by
round with the input model in one window, so that a loaded machine slows both alike: the
speedup is the median of per-round ratios, with its quartiles. The figure names are listed
in docs/architecture.md ("What MLflow holds").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compressflow.measure import ratios_to_input, static_figures

if TYPE_CHECKING:
    from torch import nn

    from compressflow.config import MeasureSpec
    from compressflow.data import DataBundle
    from compressflow.registry import MetricRegistry
    from compressflow.task import Task


@dataclass
class Evaluator:
    """The task's metrics plus the extra ones, on the evaluated split unless told otherwise.

    ``reference`` (the input model) is handed to tasks that measure fidelity to it.
    """

    task: Task
    metrics: MetricRegistry
    extra: list[str]
    loader: Any
    reference: nn.Module | None = None

    def __call__(self, model: nn.Module, loader: Any = None) -> dict[str, float]:
        loader = loader if loader is not None else self.loader
        reference = self.reference if self.task.uses_reference else None
        model.eval()
        figures = self.task.evaluate(model, loader, reference)
        for name in self.extra:
            if name not in figures:
                figures[name] = float(self.metrics.get(name).fn(model, loader))
        return figures


def latency_name(batch: int, seq_len: int | None) -> str:
    """``latency_ms_b64``, or ``latency_ms_b64_t128`` at a set sequence length."""
    return f"latency_ms_b{batch}" + (f"_t{seq_len}" if seq_len else "")


def speedup_name(batch: int, seq_len: int | None) -> str:
    """``latency_b64_speedup``, or ``latency_b64_t128_speedup`` at a set sequence length."""
    return f"latency_b{batch}" + (f"_t{seq_len}" if seq_len else "") + "_speedup"


def typical_lengths(lengths: list[int]) -> list[int]:
    """The median and the 95th percentile (one, where they coincide) of token counts."""
    import numpy as np

    middle = int(round(float(np.median(lengths))))
    tail = int(np.ceil(np.percentile(lengths, 95)))
    return [middle] if tail == middle else [middle, tail]


@dataclass
class Measurer:
    """Measures models against the pipeline's input model, as ``measure:`` says.

    Token inputs are timed at each of ``lengths`` (``measure.seq_lens``, default the
    evaluated split's median and 95th-percentile lengths); the headline figures
    ``latency_ms_b<N>`` and ``latency_b<N>_speedup`` are those at the first length.
    """

    task: Task
    spec: MeasureSpec
    bundle: DataBundle
    examples: dict[tuple[int, int | None], Any] = field(default_factory=dict)
    _lengths: list[int | None] | None = None

    @property
    def lengths(self) -> list[int | None]:
        """The sequence lengths timed; ``[None]``: inputs as the data gives them."""
        if self._lengths is None:
            if self.spec.seq_lens is not None:
                self._lengths = list(self.spec.seq_lens)
            else:
                found = self.task.token_lengths(self.bundle.val)
                self._lengths = list(typical_lengths(found)) if found else [None]
        return self._lengths

    def example(self, batch: int, seq_len: int | None = None) -> Any:
        """``batch`` real evaluated inputs (at ``seq_len`` tokens), built once per size."""
        key = (batch, seq_len)
        if key not in self.examples:
            self.examples[key] = self.bundle.example_input(batch, self.task, seq_len)
        return self.examples[key]

    def figures(self, model: nn.Module, input_model: nn.Module | None = None) -> dict[str, float]:
        """Static figures, then latency at every batch size, interleaved with ``input_model``
        (None: ``model`` is the input model, timed against a copy of itself, so that its
        row shows the noise floor: 1.0x within the spread)."""
        import copy

        figures = static_figures(model, self.example(1, self.lengths[0]), self.task)
        if self.spec.latency:
            reference = input_model or copy.deepcopy(model)
            figures.update(self.latency(model, reference))
            figures.update(self.phase_latency(model, reference))
        return figures

    def phase_latency(self, model: nn.Module, input_model: nn.Module) -> dict[str, float]:
        """``latency_ms_per_token_<phase>`` (median, and ``_iqr``) and ``<phase>_speedup``
        (with ``_q1``/``_q3``) of each of the task's :meth:`~compressflow.task.Task.phases`
        that both models have, at batch 1 and the first timed length."""
        from compressflow.timing import time_interleaved

        inputs = self.example(1, self.lengths[0])
        ours, theirs = self.task.phases(model, inputs), self.task.phases(input_model, inputs)
        out: dict[str, float] = {}
        for phase in (p for p in ours if p in theirs):
            (call, tokens), (base, _) = ours[phase], theirs[phase]
            timings = time_interleaved({"input": base, "stage": call}, rounds=self.spec.repeats,
                                       warmup=self.spec.warmup, threads=self.spec.threads)
            name = f"latency_ms_per_token_{phase}"
            found = self._named(timings, name, f"{phase}_speedup")
            found[name] /= tokens
            found[f"{name}_iqr"] /= tokens
            out.update(found)
        return out

    def latency(self, model: nn.Module, input_model: nn.Module) -> dict[str, float]:
        """``latency_ms_b<N>[_t<L>]`` (median), ``..._iqr``, and against the input model
        ``latency_b<N>[_t<L>]_speedup`` (median per-round ratio) with ``..._q1``/``..._q3``."""
        from compressflow.timing import time_models

        out: dict[str, float] = {}
        for index, batch in enumerate(self.spec.batch_sizes):
            # later (larger) batches cost more a round: fewer rounds, as before
            rounds = self.spec.repeats if index == 0 else max(3, self.spec.repeats // 3)
            for seq_len in self.lengths:
                timings = time_models({"input": input_model, "stage": model},
                                      self.example(batch, seq_len), self.task.feed, rounds=rounds,
                                      warmup=self.spec.warmup, threads=self.spec.threads)
                found = self._named(timings, latency_name(batch, seq_len), speedup_name(batch, seq_len))
                out.update(found)
                if seq_len is not None and seq_len == self.lengths[0]:  # the headline figures
                    out.update(self._named(timings, latency_name(batch, None), speedup_name(batch, None)))
        return out

    @staticmethod
    def _named(timings: Any, latency: str, speedup: str) -> dict[str, float]:
        spread, ratio = timings.spread("stage"), timings.speedup("input", "stage")
        return {latency: spread.median, f"{latency}_iqr": spread.iqr, speedup: ratio.median,
                f"{speedup}_q1": ratio.q1, f"{speedup}_q3": ratio.q3}


def compare_to_input(figures: dict[str, float], start: dict[str, float], metric: str,
                     packed_bytes: int | None) -> dict[str, float]:
    """Ratios to the input's figures, the metric's change, the packed file against the
    input's serialized state dict."""
    out = ratios_to_input(figures, start)
    out[f"{metric}_delta"] = figures[metric] - start[metric]
    if packed_bytes:
        out["compressed_bytes"] = float(packed_bytes)
        out["compressed_ratio"] = start["size_bytes"] / packed_bytes
    return out


NOISE = 0.05
"""How far below 1x an unchanged copy of a model can time for a whole window (where each
copy lies in memory moves a short call: seen 0.97x, IQR 0.93-0.99 for MiniLM, IQR
0.975-0.993 for a small MLP). A spread above ``1 - NOISE`` is not called slower."""


def honesty_notes(figures: dict[str, float], before: dict[str, float], batch_sizes: list[int],
                  lengths: list[int | None]) -> list[str]:
    """Sentences for what the figures do not show at a glance: sparsity that saved no
    bytes, a compressed model no faster than the input (its spread reaches 1x, or lies
    within :data:`NOISE` below it), a slower one (its whole spread below that)."""
    notes = []
    sparser = figures["sparsity"] > before["sparsity"] + 1e-3
    compressed = sparser or figures["macs"] < before["macs"] or figures["size_bytes"] < before["size_bytes"]
    if sparser and figures["size_bytes"] >= before["size_bytes"]:
        notes.append(f"sparsity rose to {figures['sparsity']:.1%} but the model is not smaller on "
                     "disk: its tensors are stored densely, zeros included")
    for batch in batch_sizes:
        for seq_len in lengths:
            ratio = speedup_name(batch, seq_len)
            if ratio not in figures:
                continue
            median, q1, q3 = figures[ratio], figures[f"{ratio}_q1"], figures[f"{ratio}_q3"]
            spread = f"{median:.2f}x, IQR {q1:.2f}-{q3:.2f}"
            where = f"batch {batch}" + (f", {seq_len} tokens" if seq_len else "")
            if q3 < 1.0 - NOISE:
                notes.append(f"latency at {where}: slower than the input model ({spread})")
            elif q1 <= 1.0 and compressed:
                notes.append(f"latency at {where}: no measurable speedup over the input model ({spread})")
    return notes
