"""Deep Compression on real MNIST beside the paper's Table 1 (Han, Mao, Dally, ICLR 2016).

What it measures: pipelines/deep-compression-mnist-lenet300.yaml and -lenet5.yaml, run
through compressflow once per seed into a fresh temporary sqlite store (see
benchmarks/deep_compression.py, whose ``run_seeds`` this uses), evaluated on the 10,000
official test images. Per model: the dense fp32 state dict, the pruned model packed
(relative indices + fp32 values), + weight sharing (codebook indices), + Huffman (the
pipeline's own packed file), each as bytes, ratio to dense and test error; then bits per
stored nonzero parameter of the final file. The paper's rows are printed beside ours.

    make data                                                # MNIST, sha256-pinned
    .venv/bin/python benchmarks/deep_compression_mnist.py    # 3 seeds, both models
    .venv/bin/python benchmarks/deep_compression_mnist.py --models lenet300 --seeds 1

Never asserts; wall times are printed for information only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from deep_compression import run_seeds  # noqa: E402  (the digits benchmark's pipeline runs)

PAPER = {  # Table 1: dense KB, dense error, compressed KB, ratio, compressed error
    "lenet300": ("LeNet-300-100", 1070, 1.64, 27, 40, 1.58),
    "lenet5": ("LeNet-5", 1720, 0.80, 44, 39, 0.74),
}
GOALS = {"lenet300": (40, 1.58), "lenet5": (39, 0.74)}


def mean_std(values: list[float], fmt: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} +- {format(spread, fmt)}"


def run_model(model: str, seeds: int, overrides: list[str], first: int = 0, jobs: int = 1,
              threads: int = 1) -> tuple[list[dict], list[float]]:
    """Every seed of one model's pipeline; with ``jobs`` > 1, seeds run in that many worker
    processes at once (each with ``threads`` torch threads), their rows gathered in order."""
    pipeline = REPO / "pipelines" / f"deep-compression-mnist-{model}.yaml"
    if jobs <= 1:
        return run_seeds(pipeline, seeds, overrides, first)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, initializer=_worker_init, initargs=(threads,)) as pool:
        parts = pool.starmap(run_seeds, [(pipeline, 1, overrides, seed)
                                         for seed in range(first, first + seeds)])
    return [p[0][0] for p in parts], [p[1][0] for p in parts]


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def print_table(model: str, per_seed: list[dict], timings: list[float]) -> None:
    name, dense_kb, dense_err, small_kb, ratio, small_err = PAPER[model]
    print(f"\n### {name}: paper vs compressflow ({len(per_seed)} seed(s), mean +- std)\n")
    print("| row | paper | ours: bytes | ratio to dense | test error |")
    print("|---|---|---:|---:|---:|")
    paper = {"trained fp32": f"{dense_kb} KB, {dense_err}%", "+Huffman": f"{small_kb} KB, {ratio}x, {small_err}%"}
    for row in ("trained fp32", "pruning only", "+quantization", "+Huffman"):
        size = [s[row]["bytes"] for s in per_seed]
        ratios = [s["trained fp32"]["bytes"] / s[row]["bytes"] for s in per_seed]
        errors = [100 * (1 - s[row]["accuracy"]) for s in per_seed]
        print(f"| {row} | {paper.get(row, '')} | {mean_std(size, ',.0f')} | "
              f"{mean_std(ratios, '.1f')}x | {mean_std(errors, '.2f')}% |")
    bits = [8 * s["+Huffman"]["bytes"] / s["_nonzero"] for s in per_seed]
    print(f"\nbits per stored nonzero parameter (whole file / nonzeros): {mean_std(bits, '.2f')}")
    final_ratio = [s["trained fp32"]["bytes"] / s["+Huffman"]["bytes"] for s in per_seed]
    final_err = [100 * (1 - s["+Huffman"]["accuracy"]) for s in per_seed]
    goal_ratio, goal_err = GOALS[model]
    met = min(final_ratio) >= goal_ratio and max(final_err) <= goal_err
    print(f"goal >= {goal_ratio}x at error <= {goal_err}%: worst seed {min(final_ratio):.1f}x, "
          f"{max(final_err):.2f}% -> {'met' if met else 'NOT met'} on every seed")
    print("per seed (ratio, error): " + ", ".join(
        f"{r:.1f}x {e:.2f}%" for r, e in zip(final_ratio, final_err)))
    print(f"time per seed: {statistics.mean(timings):.0f} s (information only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start there (to spread seeds over processes)")
    parser.add_argument("--models", nargs="+", choices=sorted(PAPER), default=["lenet300", "lenet5"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, in worker processes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    results = {m: run_model(m, args.seeds, args.overrides, args.first_seed, args.jobs, args.threads)
               for m in args.models}
    for model, (per_seed, timings) in results.items():
        print_table(model, per_seed, timings)


if __name__ == "__main__":
    main()
