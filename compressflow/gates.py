"""Quality gates: a stage's figures held against a reference model's, before going on.

A gate that fails with ``on_fail: stop`` ends the pipeline with exit code 3; with
``continue`` it is recorded (tags on the stage run) and the pipeline goes on.
"""

from __future__ import annotations

from compressflow.config import GateSpec
from compressflow.errors import CompressflowError


class GateFailed(CompressflowError):
    """A stage's result missed its gate; the pipeline stopped there."""

    exit_code = 3


def size_of(figures: dict[str, float]) -> float:
    """The bytes a model takes: its packed file where a stage wrote one, else its state dict."""
    return figures.get("compressed_bytes") or figures["size_bytes"]


def gate_failures(gate: GateSpec, figures: dict[str, float], reference: dict[str, float],
                  metric: str, higher_is_better: bool) -> list[str]:
    """One sentence per limit the figures miss (empty: the gate passes)."""
    failures = []
    if gate.max_metric_drop is not None:
        drop = reference[metric] - figures[metric]
        if not higher_is_better:
            drop = -drop
        if drop > gate.max_metric_drop + 1e-12:
            failures.append(f"{metric} dropped by {drop:.4f} (from {reference[metric]:.4f} to "
                            f"{figures[metric]:.4f}), more than max_metric_drop {gate.max_metric_drop}")
    if gate.min_size_ratio is not None:
        ratio = size_of(reference) / size_of(figures)
        if ratio < gate.min_size_ratio:
            failures.append(f"only {ratio:.2f}x smaller than '{gate.against}' "
                            f"({size_of(figures):,.0f} vs {size_of(reference):,.0f} bytes), "
                            f"below min_size_ratio {gate.min_size_ratio}")
    if gate.max_latency_ms_b1 is not None:
        latency = figures.get("latency_ms_b1")
        if latency is None:
            failures.append("latency_ms_b1 was not measured (measure.latency is off)")
        elif latency > gate.max_latency_ms_b1:
            failures.append(f"latency_ms_b1 {latency:.3f} ms above max_latency_ms_b1 "
                            f"{gate.max_latency_ms_b1}")
    return failures
