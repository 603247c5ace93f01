"""What a pipeline leaves to read: the summary table, and a chart of the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressflow.gates import size_of


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table, one row a stage."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def stage_chart(rows: list[dict[str, Any]], metric: str, title: str, path: Path) -> Path:
    """A PNG: the metric (left axis) and the bytes on disk (right axis) after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["stage"] for row in rows]
    sizes = [size_of(row) for row in rows]
    figure, left = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    left.plot(names, [row[metric] for row in rows], "o-", color="tab:blue")
    left.set_ylabel(metric, color="tab:blue")
    right = left.twinx()
    right.bar(names, sizes, alpha=0.3, color="tab:orange")
    right.set_ylabel("bytes on disk (packed where written)", color="tab:orange")
    right.set_yscale("log")
    left.set_zorder(right.get_zorder() + 1)
    left.patch.set_visible(False)
    left.set_title(title)
    figure.autofmt_xdate(rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
