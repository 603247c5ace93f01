"""The pipeline's summary: one row a finished stage, logged to the parent run at the end.

The rows feed the CLI's table, ``summary.json``/``summary.md``, the stage chart and the
parent run's final figures. The model registration at the end lives in
:mod:`compressflow.registration`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressflow.report import stage_chart, summary_markdown
from compressflow.tracking import Tag

if TYPE_CHECKING:
    from compressflow.stage import PipelineContext, StageResult
    from compressflow.tracking import Tracker


def summary_row(name: str, method: str, result: StageResult, metric: str, reused: bool,
                batch: int = 1) -> dict[str, Any]:
    """The stage's row: its metric, size, sparsity, MACs, latency, ratios and notes.

    ``latency_ms`` and ``latency_speedup`` are the headline figures at ``batch`` (the first
    of ``measure.batch_sizes``; for text, at the first measured length), ``timed_at`` says
    which; ``latency_ms_b1``/``latency_b1_speedup`` stay for readers of earlier summaries.
    """
    figures = result.metrics
    return {"stage": name, "method": method, metric: figures[metric],
            "size_bytes": int(figures["size_bytes"]), "sparsity": figures["sparsity"],
            "macs": int(figures["macs"]), "latency_ms_b1": figures.get("latency_ms_b1"),
            "size_ratio": figures.get("size_ratio", 1.0),
            "compressed_bytes": figures.get("compressed_bytes"),
            "compressed_ratio": figures.get("compressed_ratio"),
            "latency_b1_speedup": figures.get("latency_b1_speedup"),
            "timed_at": f"b{batch}", "latency_ms": figures.get(f"latency_ms_b{batch}"),
            "latency_speedup": figures.get(f"latency_b{batch}_speedup"),
            "reused": reused, "notes": "; ".join(result.notes)}


def log_summary(tracker: Tracker, ctx: PipelineContext, metric: str, workdir: Path,
                final_model_uri: str | None) -> None:
    """The summary files, the stage chart, the final row's figures and tags, on the parent run."""
    if not ctx.summary:
        return
    tracker.log_text(json.dumps(ctx.summary, indent=2), "summary.json")
    tracker.log_text(summary_markdown(ctx.summary), "summary.md")
    tracker.log_file(stage_chart(ctx.summary, metric, ctx.spec.name, workdir / "stages.svg"))
    final = {k: v for k, v in ctx.summary[-1].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(final)
    tags = {Tag.FINAL_STAGE: ctx.summary[-1]["stage"],
            Tag.GATE: "failed" if ctx.gate_failures else "passed"}
    if final_model_uri:
        tags[Tag.FINAL_MODEL_URI] = final_model_uri
    tracker.set_tags(tags)
