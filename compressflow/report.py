"""What a pipeline leaves to read: the summary table, and a chart of the stages."""

from __future__ import annotations

import math
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
    """An SVG (``path`` with the suffix .svg): the metric after each stage as a line on the
    left axis, the bytes on disk as bars on a log right axis. Written as text: importing a
    plotting library would cost every run more than the chart is worth."""
    from html import escape

    path = path.with_suffix(".svg")
    names = [str(row["stage"]) for row in rows]
    values = [float(row[metric]) for row in rows]
    sizes = [max(float(size_of(row)), 1.0) for row in rows]
    step, left, top, plot_h = 90, 70, 40, 200
    width = left + step * len(rows) + 80
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
    low, high = low - pad, high + pad
    decades = (math.floor(math.log10(min(sizes))), math.ceil(math.log10(max(sizes))) or 1)
    span = max(decades[1] - decades[0], 1)

    def y_metric(v: float) -> float:
        return top + plot_h * (high - v) / (high - low)

    def y_bytes(v: float) -> float:
        return top + plot_h * (decades[1] - math.log10(v)) / span

    x = [left + step * (i + 0.5) for i in range(len(rows))]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + plot_h + 90}" '
             'font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{step * len(rows)}" height="{plot_h}" fill="none" stroke="#999"/>']
    for xi, size in zip(x, sizes):
        parts.append(f'<rect x="{xi - step * 0.3:.1f}" y="{y_bytes(size):.1f}" width="{step * 0.6:.1f}" '
                     f'height="{top + plot_h - y_bytes(size):.1f}" fill="#ff7f0e" fill-opacity="0.35">'
                     f'<title>{size:,.0f} bytes</title></rect>')
    points = " ".join(f"{xi:.1f},{y_metric(v):.1f}" for xi, v in zip(x, values))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for xi, v, name in zip(x, values, names):
        parts.append(f'<circle cx="{xi:.1f}" cy="{y_metric(v):.1f}" r="4" fill="#1f77b4">'
                     f'<title>{escape(metric)} {v:.4g}</title></circle>')
        parts.append(f'<text transform="translate({xi:.1f},{top + plot_h + 14}) rotate(30)">{escape(name)}</text>')
    for fraction in (0.0, 0.5, 1.0):  # the metric's scale, left
        v = high - (high - low) * fraction
        parts.append(f'<text x="{left - 6}" y="{top + plot_h * fraction + 4:.1f}" text-anchor="end" '
                     f'fill="#1f77b4">{v:.4g}</text>')
    for decade in range(decades[0], decades[1] + 1):  # bytes, right, one label a power of ten
        parts.append(f'<text x="{left + step * len(rows) + 6}" y="{y_bytes(10 ** decade) + 4:.1f}" '
                     f'fill="#ff7f0e">1e{decade}</text>')
    parts.append(f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle" '
                 f'fill="#1f77b4">{escape(metric)}</text>')
    parts.append(f'<text transform="translate({width - 10},{top + plot_h / 2}) rotate(90)" '
                 'text-anchor="middle" fill="#ff7f0e">bytes on disk (log; packed where written)</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")
    return path
