"""``quantize/auto``: try the int8 candidates that apply, measure them here, keep the fastest
whose task metric drops by at most ``max_metric_drop``.

Candidates (each built from a copy of the stage's input model):

- ``fp32``: the input model as it is (the baseline, always eligible);
- ``dynamic-int8``: torch.ao ``quantize_dynamic`` on the Linear layers (fbgemm/x86);
- ``static-int8``: torch.ao FX static quantization calibrated on the calibration batches;
- ``torchao-int8-dynamic``: torchao ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``.

Every candidate is evaluated with the pipeline's task metric, timed with
:func:`compressflow.timing.time_interleaved`: all working candidates, fp32 among them, in one
window per batch size (1 and 64), round by round, the order alternating, on the same threads
after the same warm-up; ``rounds * repeats`` rounds at batch 1 and ``rounds * max(3, repeats //
3)`` at batch 64 (as many timed calls as ``rounds`` turns of ``repeats`` calls each). A
latency is the median of the candidate's rounds; its speedup is the median (and IQR) of the
per-round ratios fp32 ms / candidate ms, so load that hits a round hits both alike. It is
checked to survive MLflow's pickling (what ``mlflow.pytorch.log_model`` and
``load_model`` do) and the engine's measurement (params, MACs). A candidate that fails to
build or run is listed as failed, with its error; one that cannot be reloaded or measured is
listed, timed, and not chosen. Nothing is assumed about which
backend is fast: on this machine's CPU the torchao candidate is measured, not skipped.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from compressflow.measure import count_macs, count_params, size_bytes
from compressflow.timing import Spread, time_interleaved

if TYPE_CHECKING:
    from compressflow import StageContext

CANDIDATES = ("fp32", "dynamic-int8", "static-int8", "torchao-int8-dynamic")

OK, FAILED, NOT_APPLICABLE = "ok", "failed", "not applicable"
NOT_LOGGABLE, NOT_MEASURABLE = "not loggable", "not measurable"  # measured, but never chosen


@dataclass
class Candidate:
    """One row of auto's table."""

    name: str
    status: str = OK
    error: str = ""
    metric: float | None = None
    drop: float | None = None
    latency_ms_b1: float | None = None
    latency_ms_b64: float | None = None
    speedup_b1: Spread | None = None  # per-round fp32 ms / this ms, timed interleaved with fp32
    speedup_b64: Spread | None = None
    size_bytes: int | None = None
    build_s: float | None = None
    reloads: bool | None = None
    eligible: bool = False
    chosen: bool = False
    model: nn.Module | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        """The table's figures (no model)."""
        out = asdict(self)
        out.pop("model")
        return out


class NotApplicable(Exception):
    """The candidate does not apply to this model (no Linear layer, say)."""


@contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao's import logs missing CUDA extensions and pytree notices: not the user's concern."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _has_linear(model: nn.Module) -> bool:
    return any(type(m) is nn.Linear for m in model.modules())


def build_dynamic(model: nn.Module, ctx: StageContext, backend: str) -> nn.Module:
    from compressflow_quantize.dynamic import quantize_dynamic_int8

    if not _has_linear(model):
        raise NotApplicable("no nn.Linear layer")
    return quantize_dynamic_int8(copy.deepcopy(model), [])[0]


def build_static(model: nn.Module, ctx: StageContext, backend: str) -> nn.Module:
    from compressflow_quantize.static import quantize_static

    data = ctx.data
    return quantize_static(model, data.calibration, data.example_input(2), backend)[0]


def build_torchao(model: nn.Module, ctx: StageContext, backend: str) -> nn.Module:
    if not _has_linear(model):
        raise NotApplicable("no nn.Linear layer")
    with _quiet_import():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantized = copy.deepcopy(model).eval()
        quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized


BUILDERS: dict[str, Callable[[nn.Module, Any, str], nn.Module]] = {
    "fp32": lambda model, ctx, backend: model,
    "dynamic-int8": build_dynamic,
    "static-int8": build_static,
    "torchao-int8-dynamic": build_torchao,
}


def _error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


def measurable(model: nn.Module, example: torch.Tensor) -> str:
    """Why the engine could not measure ``model`` after the stage (params, MACs), or ""."""
    try:
        count_params(model)
        count_macs(model, example)
    except Exception as error:
        return f"compressflow.measure cannot count it: {_error(error)}"
    return ""


def try_candidates(model: nn.Module, ctx: StageContext, names: list[str], backend: str,
                   higher_is_better: bool, max_drop: float) -> list[Candidate]:
    """Build, reload-check and evaluate every candidate (latency comes after, in turns)."""
    from compressflow_quantize.static import reloads

    example = ctx.data.example_input(2)
    model.eval()
    candidates = []
    for name in names:
        cand = Candidate(name)
        candidates.append(cand)
        start = time.perf_counter()
        try:
            cand.model = BUILDERS[name](model, ctx, backend)
            cand.build_s = time.perf_counter() - start
            with torch.inference_mode():
                cand.model.eval()(example)
        except NotApplicable as why:
            cand.status, cand.error, cand.model = NOT_APPLICABLE, str(why), None
            continue
        except Exception as error:
            cand.status, cand.error, cand.model = FAILED, _error(error), None
            continue
        cand.size_bytes = size_bytes(cand.model)
        cand.reloads, why = reloads(cand.model, example)
        if not cand.reloads:
            cand.status, cand.error = NOT_LOGGABLE, why
        else:
            why = measurable(cand.model, example)
            if why:
                cand.status, cand.error = NOT_MEASURABLE, why
        try:
            cand.metric = ctx.evaluate(cand.model)[ctx.metric]
        except Exception as error:
            cand.status, cand.error, cand.model = FAILED, _error(error), None
    mark_eligible(candidates, ctx.evaluate(model)[ctx.metric], higher_is_better, max_drop)
    return candidates


def mark_eligible(candidates: list[Candidate], baseline: float, higher_is_better: bool,
                  max_drop: float) -> None:
    """Set each candidate's drop from ``baseline`` and whether it may be chosen: it works,
    reloads, and its metric drops by at most ``max_drop``."""
    for cand in candidates:
        if cand.metric is not None:
            cand.drop = (baseline - cand.metric) if higher_is_better else (cand.metric - baseline)
        cand.eligible = cand.status == OK and cand.drop is not None and cand.drop <= max_drop + 1e-12


class _CallFailed(Exception):
    """A candidate's forward pass raised while it was being timed."""

    def __init__(self, cand: Candidate, error: BaseException):
        super().__init__(cand.name)
        self.cand, self.error = cand, error


def _forward(cand: Candidate, example: torch.Tensor) -> Callable[[], object]:
    model = cand.model

    def call() -> object:
        try:
            return model(example)
        except Exception as error:
            raise _CallFailed(cand, error) from error

    return call


def time_candidates(candidates: list[Candidate], ctx: StageContext, threads: int, warmup: int,
                    repeats: int, rounds: int) -> None:
    """Latency at batch 1 and 64 of every working candidate, all timed interleaved with fp32
    in one window per batch size; speedups are per-round ratios to fp32."""
    data = ctx.data
    timed = [c for c in candidates if c.model is not None]
    for cand in timed:
        cand.model.eval()
    for batch, per_turn in ((1, repeats), (64, max(3, repeats // 3))):
        example = data.example_input(batch)
        while True:
            alive = [c for c in timed if c.status != FAILED]
            if not alive:
                break
            try:
                timings = time_interleaved({c.name: _forward(c, example) for c in alive},
                                           rounds=rounds * per_turn, warmup=warmup,
                                           threads=threads)
            except _CallFailed as failed:  # a kernel missing for one batch shape, say
                cand = failed.cand
                cand.status, cand.error, cand.eligible = FAILED, _error(failed.error), False
                continue  # the window again, without it
            break
        for cand in alive:
            setattr(cand, f"latency_ms_b{batch}", timings.spread(cand.name).median)
            if "fp32" in timings.samples:
                setattr(cand, f"speedup_b{batch}", timings.speedup("fp32", cand.name))
    for cand in timed:
        if cand.status == FAILED or cand.latency_ms_b1 is None or cand.latency_ms_b64 is None:
            cand.latency_ms_b1 = cand.latency_ms_b64 = None
            cand.speedup_b1 = cand.speedup_b64 = None
            cand.eligible = False


def choose(candidates: list[Candidate], optimize_for: str) -> Candidate:
    """The eligible candidate of least ``optimize_for`` latency (the first, on a tie)."""
    key = "latency_ms_b1" if optimize_for == "latency_b1" else "latency_ms_b64"
    eligible = [c for c in candidates if c.eligible and getattr(c, key) is not None]
    if not eligible:
        raise RuntimeError("no candidate is eligible, not even fp32")
    best = min(eligible, key=lambda c: getattr(c, key))
    best.chosen = True
    return best


def table_markdown(candidates: list[Candidate], metric: str, max_drop: float,
                   optimize_for: str) -> str:
    """auto's table: one row a candidate, the chosen one marked."""
    fp32 = next((c for c in candidates if c.name == "fp32" and c.latency_ms_b1), None)

    def speedup(c: Candidate, batch: int) -> str:
        spread = getattr(c, f"speedup_b{batch}")
        if spread is not None:
            return f"{spread.median:.2f} ({spread.q1:.2f}-{spread.q3:.2f})"
        key = f"latency_ms_b{batch}"  # figures set by hand: the ratio of the medians
        by_hand = getattr(fp32, key) / getattr(c, key) if fp32 and getattr(c, key) else None
        return num(by_hand, ".2f")

    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [
        f"quantize/auto: fastest by {optimize_for} among candidates whose {metric} drops by at "
        f"most {max_drop} from the input model; latencies are medians measured on this machine, "
        "every candidate timed interleaved with fp32 in one window; speedups are the medians of "
        "the per-round ratios fp32 ms / candidate ms, their IQR in parentheses.",
        "",
        f"| candidate | status | {metric} | drop | latency_ms_b1 | latency_ms_b64 | "
        "speedup_b1_vs_fp32 | speedup_b64_vs_fp32 | size_bytes | reloads | eligible | chosen | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        lines.append(" | ".join([
            f"| {c.name}", c.status, num(c.metric, ".4f"), num(c.drop, "+.4f"),
            num(c.latency_ms_b1, ".4f"), num(c.latency_ms_b64, ".4f"),
            speedup(c, 1), speedup(c, 64),
            num(c.size_bytes, "d"), "" if c.reloads is None else ("yes" if c.reloads else "no"),
            "yes" if c.eligible else "no", "**yes**" if c.chosen else "", c.error]) + " |")
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a table written by :func:`table_markdown`, as strings by column."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|"))))
            for row in rows[2:]]


def auto_quantize(model: nn.Module, ctx: StageContext, p) -> tuple[nn.Module, dict, dict, list[str]]:
    """Try, measure, choose; returns (model, metrics, artifacts, notes)."""
    names = list(dict.fromkeys(["fp32", *p.candidates]))  # the baseline always competes
    candidates = try_candidates(model, ctx, names, p.backend, p.higher_is_better,
                                p.max_metric_drop)
    time_candidates(candidates, ctx, p.threads, p.warmup, p.repeats, p.rounds)
    chosen = choose(candidates, p.optimize_for)

    metric = ctx.metric
    for c in candidates:
        for figure in ("metric", "drop", "latency_ms_b1", "latency_ms_b64", "size_bytes"):
            value = getattr(c, figure)
            if value is not None:
                ctx.log_metric(f"auto.{c.name}.{metric if figure == 'metric' else figure}", value)
        for figure in ("speedup_b1", "speedup_b64"):  # the median of the per-round ratios
            if getattr(c, figure) is not None:
                ctx.log_metric(f"auto.{c.name}.{figure}", getattr(c, figure).median)
    table = table_markdown(candidates, metric, p.max_metric_drop, p.optimize_for)
    workdir = Path(ctx.workdir)
    md = workdir / "quantize_auto.md"
    md.write_text(table)
    js = workdir / "quantize_auto.json"
    js.write_text(json.dumps({
        "metric": metric, "max_metric_drop": p.max_metric_drop, "optimize_for": p.optimize_for,
        "threads": p.threads, "warmup": p.warmup, "repeats": p.repeats, "rounds": p.rounds,
        "chosen": chosen.name, "candidates": [c.row() for c in candidates]}, indent=2))

    key = "latency_ms_b1" if p.optimize_for == "latency_b1" else "latency_ms_b64"
    fp32 = next(c for c in candidates if c.name == "fp32")
    spread = getattr(chosen, key.replace("latency_ms", "speedup"))
    if spread is None:  # fp32 itself did not run through the window
        base = getattr(fp32, key)
        spread = Spread.of([base / getattr(chosen, key) if base else float("nan")])
    speedup = spread.median
    rest = [f"{c.name} {c.status}" + (f" ({getattr(c, key):.4g} ms, drop {c.drop:+.4f})"
                                      if getattr(c, key) is not None and c.drop is not None else
                                      f" ({c.error})")
            for c in candidates if c is not chosen]
    note = (f"auto chose {chosen.name}: the fastest by {p.optimize_for} ({getattr(chosen, key):.4g} ms, "
            f"{speedup:.2f}x fp32, IQR {spread.q1:.2f}-{spread.q3:.2f}) among candidates "
            f"whose {metric} drops by at most "
            f"{p.max_metric_drop} (its drop {chosen.drop:+.4f}); others: {'; '.join(rest)}")
    metrics = {
        "auto_candidates": len(candidates),
        "auto_eligible": sum(c.eligible for c in candidates),
        f"auto_speedup_{p.optimize_for}": speedup,
        f"auto_{metric}_drop": chosen.drop,
    }
    model_out = chosen.model
    for c in candidates:
        c.model = None
    return model_out, metrics, {"quantize_auto": md, "quantize_auto_json": js}, [note]
