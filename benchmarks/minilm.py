"""all-MiniLM-L6-v2: every compression method side by side, timed in one interleaved window.

Each method is its pipeline in pipelines/ (minilm-*.yaml), run by the engine as
`compressflow run` runs it (a throwaway sqlite store, models not logged, the engine's own
latency off), so every cosine, Spearman's rho, byte count and sparsity below is the figure
the pipeline's final stage logs: on the 2,411 held-out vader-icwsm2014 sentences, against
the fp32 input model. Then every model is timed in ONE window (compressflow.timing: round
by round, each model once a round in alternating order, 2 threads, batch 32 of real
held-out sentences cut or tiled to the length), at the sentences' median and 95th-percentile
token lengths; a speedup is the median of the per-round ratios fp32 ms / model ms, with its
IQR. The fp32 row is a copy of the input model, timed like the rest: its spread is the
noise floor.

    make data && .venv/bin/python benchmarks/minilm.py
    .venv/bin/python benchmarks/minilm.py --only ort-dynamic,torch-int8 --rounds 40
    .venv/bin/python benchmarks/minilm.py --cache /tmp/minilm   # keep built models; re-time

`--cache` keeps each method's model and figures (pickled) so that a second run only times
them (on a quiet machine, say). Nothing is asserted: a missed goal is printed as missed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"


@dataclass
class Method:
    """One row: a pipeline (with ``--set`` overrides), the stage whose model it is, a goal."""

    key: str
    label: str
    pipeline: str
    overrides: list[str] = field(default_factory=list)
    stage: str | None = None  # default: the final stage
    goal: tuple[float, float, float] | None = None  # (speedup, cosine, smaller) at least


DISTILL = "stages.1.distill.epochs"
METHODS = [
    Method("ort-fp32", "onnxruntime fp32", "minilm-ort-int8.yaml", stage="0-export"),
    Method("ort-dynamic", "onnxruntime dynamic int8, per channel", "minilm-ort-int8.yaml",
           goal=(1.9, 0.99, 3.5)),
    Method("ort-static", "onnxruntime static int8 (QDQ MatMul)", "minilm-ort-static-int8.yaml"),
    Method("torch-int8-linear", "torch.ao dynamic int8, Linear only (the old default)",
           "minilm-torch-int8.yaml", ["stages.0.quantize.per_channel=false",
                                      "stages.0.quantize.embeddings=false"]),
    Method("torch-int8", "torch.ao dynamic int8 + embeddings, per channel",
           "minilm-torch-int8.yaml", goal=(0.0, 0.95, 3.0)),
    Method("heads", "heads 12->9, FFN 1536->768 (OBS-ranked, refitted), distilled",
           "minilm-heads.yaml",
           goal=(1.5, 0.95, 0.0)),
    Method("layers", "6 -> 3 layers, refitted, distilled", "minilm-layers.yaml", goal=(1.8, 0.93, 0.0)),
    Method("sparse-ls", "50% least-squares (SparseGPT)", "minilm-sparse.yaml"),
    Method("sparse-mag", "50% magnitude", "minilm-sparse.yaml", ["stages.0.prune.method=magnitude"]),
    Method("24-ls", "2:4 least-squares", "minilm-sparse.yaml", ["stages.0.prune.pattern=2:4"]),
    Method("24-mag", "2:4 magnitude", "minilm-sparse.yaml",
           ["stages.0.prune.method=magnitude", "stages.0.prune.pattern=2:4"]),
]
FIGURES = ("cosine_mean", "cosine_min", "spearman", "size_bytes", "sparsity", "params_total")


def build(method: Method, store: str, extra: list[str]):
    """Run the method's pipeline: its model and figures, and the input model's (with the
    measurer that holds the held-out sentences)."""
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    overrides = ["measure.latency=false", "tracking.log_models=false", *method.overrides, *extra]
    runner = PipelineRunner(validate(PIPELINES / method.pipeline, overrides), tracking_uri=store)
    ctx = runner.run()
    stage = method.stage or list(ctx.results)[-1]
    figures = {k: ctx.results[stage].metrics[k] for k in FIGURES}
    base = (runner.models["input"], runner.measurer, ctx.results["input"].metrics)
    return runner.models[stage], figures, base


def built(method: Method, store: str, cache: Path | None, extra: list[str]):
    """``(model, figures, base or None)``, from ``cache`` where it holds the method."""
    saved = cache / f"{method.key}.pkl" if cache else None
    if saved and saved.exists():
        print(f"  {method.key}: from {saved}", flush=True)
        return (*pickle.loads(saved.read_bytes()), None)
    started = time.perf_counter()
    model, figures, base = build(method, store, extra)
    print(f"  {method.key}: built in {time.perf_counter() - started:.0f} s, "
          f"cosine {figures['cosine_mean']:.4f}", flush=True)
    if saved:
        saved.write_bytes(pickle.dumps((model, figures)))
    return model, figures, base


def timed(models: dict, base, measurer, rounds: int) -> dict:
    """``{length: Timings}``: fp32 and every model in one window per length."""
    from compressflow.timing import time_models

    import copy

    out = {}
    for length in measurer.lengths:
        everyone = {"fp32": base, "fp32 copy": copy.deepcopy(base), **models}
        out[length] = time_models(everyone, measurer.example(32, length), measurer.task.feed,
                                  rounds=rounds, warmup=3, threads=2)
        print(f"  timed at {length} tokens", flush=True)
    return out


def verdict(method: Method, figures: dict, speedup: float, smaller: float) -> str:
    """``met``, or what missed and by how much."""
    if method.goal is None:
        return "-"
    fast, cosine, size = method.goal
    missed = [f"{what} {got:.3g} < {want:g}" for what, got, want in
              (("speedup", speedup, fast), ("cosine", figures["cosine_mean"], cosine),
               ("smaller", smaller, size)) if want and got < want]
    return "met" if not missed else "missed: " + ", ".join(missed)


def table(methods: list[Method], figures: dict, base_figures: dict, timings: dict) -> str:
    """The Markdown table: one row a method, the fp32 row first."""
    lengths = list(timings)
    head = ["method", "bytes", "smaller", "cosine mean", "cosine min", "spearman", "sparsity",
            *[f"faster b32 t{n} (IQR)" for n in lengths], "goal"]
    rows = [["fp32 (input)", f"{int(base_figures['size_bytes']):,}", "1.00x", "1.0000", "1.0000",
             "1.0000", f"{base_figures['sparsity']:.1%}",
             *[_speed(timings[n], "fp32 copy") for n in lengths], "-"]]
    for method in methods:
        found = figures[method.key]
        smaller = base_figures["size_bytes"] / found["size_bytes"]
        speedup = timings[lengths[0]].speedup("fp32", method.key).median
        rows.append([method.label, f"{int(found['size_bytes']):,}", f"{smaller:.2f}x",
                     f"{found['cosine_mean']:.4f}", f"{found['cosine_min']:.4f}",
                     f"{found['spearman']:.4f}", f"{found['sparsity']:.1%}",
                     *[_speed(timings[n], method.key) for n in lengths],
                     verdict(method, found, speedup, smaller)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _speed(timings, key: str) -> str:
    ratio = timings.speedup("fp32", key)
    return f"{ratio.median:.2f}x ({ratio.q1:.2f}-{ratio.q3:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated method keys: " + ", ".join(m.key for m in METHODS))
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per length")
    parser.add_argument("--cache", type=Path, help="keep built models here; reuse them")
    parser.add_argument("--distill-epochs", type=int, help="epochs of the distilled methods")
    args = parser.parse_args(argv)
    if not (ROOT / "data" / "vader-icwsm2014" / "train.txt").exists():
        print("the corpus is missing: run `make data` first", file=sys.stderr)
        return 2
    chosen = [m for m in METHODS if not args.only or m.key in args.only.split(",")]
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    models, figures, base = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/bench.db"
        for method in chosen:
            extra = [f"{DISTILL}={args.distill_epochs}"] if (
                args.distill_epochs and method.key in ("heads", "layers")) else []
            models[method.key], figures[method.key], found = built(method, store, args.cache, extra)
            base = base or found
        if base is None:  # every model came from the cache: the input model from a quick run
            base = build(next(m for m in METHODS if m.key == "torch-int8"), store, [])[2]
    base_model, measurer, base_figures = base
    timings = timed(models, base_model, measurer, args.rounds)
    print()
    print(table(chosen, figures, base_figures, timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
