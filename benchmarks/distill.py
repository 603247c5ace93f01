"""How much of the teacher-student gap distillation closes, where there is a gap.

What it measures: pipelines/distill-digits.yaml, run as it is (the engine, the plugins, a
throwaway MLflow sqlite store), once per seed (``--set seed=N``: the seed picks the validation
split, the 20% training subset and every initialisation). Per seed: the teacher's validation
accuracy (64-300-100-10, trained on the whole training split), the student's trained alone
on 20% of it, the same student distilled from the teacher on the same 20%, and the share of
the gap distillation closes, ``(distilled - alone) / (teacher - alone)``.

The summary gives the mean accuracies and the gap closed by the means (the headline: a ratio
of means, not swung by a seed whose gap is one or two images), and next to it the mean of the
per-seed ratios. Validation is 360 images: one image is 0.28 points, so a single seed's ratio
moves by ~10 points for one image; read the mean.

``--set`` overrides the pipeline (as ``compressflow run --set`` does), to try other settings;
``--sweep`` runs a few temperature/alpha/epoch settings of the distill stage, one summary line
each. Model logging and latency timing are switched off (accuracy is all this measures);
torch runs on one thread unless ``--threads`` says otherwise. Timings are printed, never
asserted; about 40 s a seed on this 2-core machine, most of it the training loop and MLflow
logging every epoch's figures.

    .venv/bin/python benchmarks/distill.py                      # 5 seeds, the pipeline as is
    .venv/bin/python benchmarks/distill.py --seeds 3 --set stages.2.distill.temperature=4
    .venv/bin/python benchmarks/distill.py --sweep
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "distill-digits.yaml"
DISTILL = "stages.2.distill"
SWEEP = [  # (label, overrides of the distill stage): Hinton's usual setting first
    ("T=4 a=0.9", {"temperature": 4, "alpha": 0.9}),
    ("T=8 a=1.0", {"temperature": 8, "alpha": 1.0}),
    ("T=16 a=0.9", {"temperature": 16, "alpha": 0.9}),
    ("T=16 a=1.0", {"temperature": 16, "alpha": 1.0}),
    ("T=32 a=1.0", {"temperature": 32, "alpha": 1.0}),
]


def run_seed(seed: int, overrides: list, uri: str, stages: tuple[str, str, str]) -> dict[str, float]:
    """One pipeline run; the validation accuracy of the teacher, alone and distilled stages."""
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    plan = validate(PIPELINE, [("seed", seed), ("measure", {"latency": False}),
                               ("tracking.log_models", False), *overrides])
    ctx = PipelineRunner(plan, tracking_uri=uri, experiment="distill-benchmark").run()
    teacher, alone, distilled = (ctx.results[name].metrics["accuracy"] for name in stages)
    return {"teacher": teacher, "alone": alone, "distilled": distilled}


def closed(row: dict[str, float]) -> float:
    """Share of the teacher-alone gap the distilled student closes (nan without a gap)."""
    gap = row["teacher"] - row["alone"]
    return (row["distilled"] - row["alone"]) / gap if gap > 0 else float("nan")


def run(seeds: list[int], overrides: list, uri: str, stages, quiet: bool = False) -> dict[str, float]:
    """Every seed, a row each (unless quiet); returns the summary."""
    rows = []
    if not quiet:
        print(f"{'seed':>4}  {'teacher':>7}  {'alone':>7}  {'distilled':>9}  {'gap closed':>10}  {'time':>6}")
    for seed in seeds:
        start = time.perf_counter()
        row = run_seed(seed, overrides, uri, stages)
        rows.append(row)
        if not quiet:
            print(f"{seed:>4}  {row['teacher']:7.4f}  {row['alone']:7.4f}  {row['distilled']:9.4f}"
                  f"  {closed(row):10.0%}  {time.perf_counter() - start:5.0f}s", flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("teacher", "alone", "distilled")}
    mean["closed"] = closed(mean)
    ratios = [closed(r) for r in rows if r["teacher"] > r["alone"]]
    mean["mean_of_ratios"] = statistics.mean(ratios) if ratios else float("nan")
    mean["wins"] = sum(r["distilled"] > r["alone"] for r in rows)
    if not quiet:
        print(f"{'mean':>4}  {mean['teacher']:7.4f}  {mean['alone']:7.4f}  {mean['distilled']:9.4f}"
              f"  {mean['closed']:10.0%}")
        print(f"gap closed by the means: {mean['closed']:.0%}; mean of the per-seed ratios: "
              f"{mean['mean_of_ratios']:.0%}; distilled beat alone on {mean['wins']} of {len(rows)} seeds")
    return mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override the pipeline, as compressflow run --set (repeatable)")
    parser.add_argument("--sweep", action="store_true",
                        help="try a few temperature/alpha settings of the distill stage")
    parser.add_argument("--stages", default="teacher,alone,distilled",
                        help="the names of the teacher, student-alone and distilled stages")
    parser.add_argument("--tracking-uri", default=None, help="default: a throwaway sqlite store")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these models are tiny, and two threads "
                        "contending on a busy 2-core machine made every step ~5x slower)")
    args = parser.parse_args(argv)
    stages = tuple(args.stages.split(","))
    seeds = list(range(args.seeds))
    uri = args.tracking_uri or f"sqlite:///{Path(tempfile.mkdtemp(prefix='distill-bench-')) / 'mlflow.db'}"
    import torch

    torch.set_num_threads(args.threads)
    print(f"{PIPELINE.relative_to(REPO)}, seeds {seeds[0]}-{seeds[-1]}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, store {uri}"
          + (f", --set {' '.join(args.overrides)}" if args.overrides else ""))
    if not args.sweep:
        run(seeds, args.overrides, uri, stages)
        return 0
    print(f"{'distill settings':<22} {'teacher':>7}  {'alone':>7}  {'distilled':>9}  {'gap closed':>10}"
          f"  {'mean of ratios':>14}  wins")
    for label, settings in SWEEP:
        overrides = [*args.overrides, *(f"{DISTILL}.{k}={v}" for k, v in settings.items())]
        mean = run(seeds, overrides, uri, stages, quiet=True)
        print(f"{label:<22} {mean['teacher']:7.4f}  {mean['alone']:7.4f}  {mean['distilled']:9.4f}"
              f"  {mean['closed']:10.0%}  {mean['mean_of_ratios']:14.0%}  {mean['wins']}/{len(seeds)}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
