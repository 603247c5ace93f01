"""Overhead of compressflow over the same work written as a plain PyTorch script.

Measures a pipeline run by compressflow (engine.validate + PipelineRunner, fresh temp sqlite
MLflow store, models logged) against the same work as a plain PyTorch script, for
``--pipeline``:

- ``quickstart``: pipelines/quickstart.yaml (train MLP 64-300-100-10 on digits, distill
  64-128-10, prune 80%, finetune, int8; accuracy after each stage) against plain_work()
  below: seconds of work, so the fixed costs show;
- ``lenet300``: pipelines/deep-compression-mnist-lenet300.yaml (LeNet-300-100 on MNIST: 20
  epochs, gradual pruning, 15 epochs, 5-bit k-means, the packed file) against
  benchmarks/plain_lenet300.py: minutes of real work (``make data`` first).
 Variants with tracking.log_models / measure.latency off
show what those cost; the full run is instrumented (wrapped functions) to show where time goes.
Each run is a fresh subprocess (imports are part of what a user waits for); variants alternate,
rotating, so drift and other load hit all alike. wall: subprocess start to exit; work: after
imports; cpu: the child's user+sys seconds, less swayed by other load (more so with --threads 1).

    .venv/bin/python benchmarks/overhead.py      # 2 repeats; --repeats 3 --variants plain,compressflow
    .venv/bin/python benchmarks/overhead.py --pipeline lenet300 --variants plain,compressflow

Goal: compressflow / plain <= 1.15 (median wall) with MLflow logging on. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINES = {"quickstart": REPO / "pipelines" / "quickstart.yaml",
             "lenet300": REPO / "pipelines" / "deep-compression-mnist-lenet300.yaml"}
VARIANTS = {  # name -> overrides (None: the plain script)
    "plain": None,
    "compressflow": [],
    "cf log_models=false": ["tracking.log_models=false"],
    # "measure.latency=false" fails when the file has no measure: section; this form works
    "cf latency=false": ["measure={latency: false}"],
}
TRACKED = ("log_metric", "log_metrics", "log_model", "log_text", "log_file", "set_tags",
           "start_pipeline", "start_stage", "end_stage", "end_pipeline", "find_stage",
           "log_dataset")


def plain_work() -> dict[str, float]:
    """The quickstart as a user would write it by hand; returns accuracy after each stage.

    Seeds follow the pipeline's (0 for data and input model, seed + index + 1 per stage), so
    the accuracies match compressflow's exactly when both do the same arithmetic.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def mlp(hidden):
        widths, layers = [64, *hidden], []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(nn.Flatten(), *layers, nn.Linear(widths[-1], 10))

    def accuracy(model):
        with torch.inference_mode():
            return float((model.eval()(x_val).argmax(1) == y_val).float().mean())

    def fit(model, epochs, loss_fn, masks=None):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            model.train()
            for x, y in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y, x)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for p, m in (masks or {}).items():
                        p.mul_(m)

    def kd(out, y, x, T=4.0, alpha=0.9):
        with torch.no_grad():
            soft_t = F.softmax(teacher(x) / T, dim=1)
        soft = F.kl_div(F.log_softmax(out / T, dim=1), soft_t, reduction="batchmean") * T * T
        return alpha * soft + (1 - alpha) * F.cross_entropy(out, y)

    ce = lambda out, y, x: F.cross_entropy(out, y)  # noqa: E731
    torch.manual_seed(0)
    mlp([300, 100])  # the pipeline's input model: consumes the same random numbers
    features, labels = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(features, labels, test_size=0.2,
                                              stratify=labels, random_state=0)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std < 1e-6] = 1.0
    to_t = lambda x: torch.tensor((x - mean) / std, dtype=torch.float32)  # noqa: E731
    train = TensorDataset(to_t(x_tr), torch.tensor(y_tr))
    x_val, y_val = to_t(x_va), torch.tensor(y_va)
    generator = torch.Generator().manual_seed(0)
    torch.randperm(len(train), generator=generator)  # compressflow draws its calibration rows
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=generator)
    acc = {}
    torch.manual_seed(1)
    teacher = mlp([300, 100])
    fit(teacher, 30, ce)
    acc["baseline"] = accuracy(teacher)
    torch.manual_seed(2)
    student = mlp([128])
    fit(student, 30, kd)
    acc["student"] = accuracy(student)
    weights = [m.weight for m in student.modules() if isinstance(m, nn.Linear)]
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.topk(scores, round(0.8 * scores.numel()), largest=False).indices] = False
    masks = {w: m.view_as(w) for w, m in zip(weights, keep.split([w.numel() for w in weights]))}
    for w, m in masks.items():
        w.data.mul_(m)
    acc["prune"] = accuracy(student)
    torch.manual_seed(4)
    fit(student, 10, ce, masks)
    acc["finetune"] = accuracy(student)
    torch.backends.quantized.engine = "fbgemm"
    quantized = torch.ao.quantization.quantize_dynamic(student.eval(), {nn.Linear}, torch.qint8)
    acc["quantize"] = accuracy(quantized)
    return acc


def _timed(owner, name: str, parts: dict[str, float], label: str) -> None:
    """Replace ``owner.name`` (if it exists) with a wrapper adding its time to ``parts[label]``."""
    if (original := getattr(owner, name, None)) is None:
        return

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            parts[label] = parts.get(label, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)


def compressflow_work(pipeline: Path, overrides: list[str], uri: str, parts: dict[str, float]) -> dict[str, float]:
    """validate + PipelineRunner.run with leaf costs timed into ``parts``; stage accuracies."""
    from compressflow import engine, measuring, provenance, runner, summary, tracking

    init = tracking.Tracker.__init__

    def tracker_init(self, *args, **kwargs):
        start = time.perf_counter()
        import mlflow  # noqa: F401  (the first thing Tracker.__init__ does anyway)
        parts["mlflow: import"] = time.perf_counter() - start
        start = time.perf_counter()
        init(self, *args, **kwargs)
        parts["mlflow: new store + set_experiment"] = time.perf_counter() - start

    tracking.Tracker.__init__ = tracker_init
    for name in TRACKED:  # every call of these is an MLflow round trip
        _timed(tracking.Tracker, name, parts, f"mlflow: Tracker.{name}")
    _timed(measuring.Measurer, "figures", parts, "measure (size, MACs, latency)")
    _timed(measuring.Evaluator, "__call__", parts, "evaluate (after every stage and epoch)")
    _timed(provenance, "git_commit", parts, "git rev-parse")
    _timed(summary, "stage_chart", parts, "summary chart (SVG)")
    start = time.perf_counter()
    plan = engine.validate(pipeline, overrides)
    parts["validate + load plugins"] = time.perf_counter() - start
    ctx = runner.PipelineRunner(plan, tracking_uri=uri).run()
    return {name: r.metrics["accuracy"] for name, r in ctx.results.items() if name != "input"}


def worker(variant: str, pipeline: str) -> None:
    """One measured run in this (fresh) process; prints a JSON line for the parent."""
    start, parts = time.perf_counter(), {}
    if VARIANTS[variant] is None:
        import sklearn.model_selection  # noqa: F401
        import torch  # noqa: F401
        imported = time.perf_counter()
        if pipeline == "lenet300":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from plain_lenet300 import plain_work as plain_lenet300

            acc = plain_lenet300()
        else:
            acc = plain_work()
    else:
        import compressflow.engine  # noqa: F401
        import compressflow.runner  # noqa: F401  (imports torch, through compressflow.measure)
        imported = time.perf_counter()
        acc = compressflow_work(PIPELINES[pipeline], VARIANTS[variant],
                                f"sqlite:///{Path.cwd() / 'mlflow.db'}", parts)
    print(json.dumps({"import_s": imported - start, "work_s": time.perf_counter() - imported,
                      "accuracy": acc, "parts": parts}))


def run_once(variant: str, threads: int | None, pipeline: str) -> dict:
    """Run ``variant`` in a fresh subprocess inside a temp folder; its figures, wall and CPU s."""
    folder = tempfile.mkdtemp(prefix="cf-bench-")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    try:
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", variant,
                               "--pipeline", pipeline],
                              cwd=folder, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(f"{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {**figures, "wall_s": wall, "edges_s": wall - figures["import_s"] - figures["work_s"],
            "cpu_s": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime}


def report(runs: dict[str, list[dict]]) -> None:
    """Print the variants table, the goal ratio and the full compressflow run's breakdown."""
    med = lambda v, key: statistics.median(r[key] for r in runs[v])  # noqa: E731
    base = med("plain", "wall_s") if "plain" in runs else None
    print(f"load avg after: {os.getloadavg()[0]:.2f}  (other work on this machine skews wall times)")
    print(f"\n{'variant':<20} {'median s':>9} {'min s':>7} {'cpu s':>7} {'imports':>8} {'work':>7} "
          f"{'start+exit':>10} {'wall/plain':>10} {'cpu/plain':>9}  accuracy after each stage")
    for v, rows in runs.items():
        ratio = (f"{med(v, 'wall_s') / base:10.3f} {med(v, 'cpu_s') / med('plain', 'cpu_s'):9.3f}"
                 if base else f"{'-':>10} {'-':>9}")
        print(f"{v:<20} {med(v, 'wall_s'):9.2f} {min(r['wall_s'] for r in rows):7.2f} "
              f"{med(v, 'cpu_s'):7.2f} {med(v, 'import_s'):8.2f} {med(v, 'work_s'):7.2f} "
              f"{med(v, 'edges_s'):10.2f} {ratio}  "
              + " ".join(f"{a:.4f}" for a in rows[-1]["accuracy"].values()))
    if "compressflow" not in runs:
        return
    if base:
        ratio = med("compressflow", "wall_s") / base
        print(f"\ncompressflow / plain (median wall, MLflow on, models logged): {ratio:.3f}  "
              f"(goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    full = runs["compressflow"]
    rows = [("interpreter start + exit", med("compressflow", "edges_s")),
            ("imports (compressflow core, torch via measure)", med("compressflow", "import_s"))]
    rows += [(label, statistics.median(r["parts"].get(label, 0.0) for r in full))
             for label in sorted({k for r in full for k in r["parts"]})]
    rows.append(("rest: data, training loops, copies...",
                 statistics.median(r["work_s"] - sum(r["parts"].values()) for r in full)))
    print("\nwhere the full compressflow run's time goes (median s over repeats):")
    for label, seconds in rows:
        print(f"  {label:<48} {seconds:7.2f}")
    if base:
        print(f"  {'(plain script: imports / work / whole wall)':<48} {med('plain', 'import_s'):7.2f}"
              f" / {med('plain', 'work_s'):.2f} / {base:.2f}")
    for v in (v for v in runs if v.startswith("cf ")):
        print(f"  wall saved by {v!r}: {med('compressflow', 'wall_s') - med(v, 'wall_s'):6.2f} s")


def main() -> None:
    """Parse arguments; run every variant ``--repeats`` times, alternating; print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every run (default: torch's own choice)")
    parser.add_argument("--pipeline", choices=list(PIPELINES), default="quickstart")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.pipeline)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.2f}, MLFLOW_DISABLE_TELEMETRY="
          f"{os.environ.get('MLFLOW_DISABLE_TELEMETRY', '(unset)')}, threads "
          f"{args.threads or 'default'}; {args.pipeline}; fresh subprocess per run, variants alternating")
    runs: dict[str, list[dict]] = {v.strip(): [] for v in args.variants.split(",")}
    for repeat in range(args.repeats):  # rotate the order: no variant always runs first
        for variant in [*runs][repeat % len(runs):] + [*runs][:repeat % len(runs)]:
            figures = run_once(variant, args.threads, args.pipeline)
            runs[variant].append(figures)
            print(f"  repeat {repeat + 1}/{args.repeats}  {variant:<20} wall {figures['wall_s']:6.2f} s"
                  f"  cpu {figures['cpu_s']:6.2f} s  (imports {figures['import_s']:.2f}, work "
                  f"{figures['work_s']:.2f}, start+exit {figures['edges_s']:.2f})", flush=True)
    report(runs)


if __name__ == "__main__":
    main()
