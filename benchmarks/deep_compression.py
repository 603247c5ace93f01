"""Deep Compression on digits, part by part, over several seeds (Han et al. 2016, Table 1 style).

What it measures: pipelines/deep-compression-digits.yaml (MLP 64-300-100-10: train, gradual
magnitude prune to 92%, finetune, quantize/kmeans 3-bit with fp16 biases, export/packed) run
through compressflow once per seed (the seed also draws the data split), each into a fresh
temporary sqlite MLflow store. From each run's models it writes the packed format with
parts of it switched off, to show what each step of the paper buys:

    trained fp32           the trained model's size_bytes (torch.save of its state dict)
    pruning only           the finetuned (pruned) model packed: relative indices + fp32 values,
                           fixed-width, no codebook, no fp16
    +quantization          the k-means model packed: relative indices + codebook indices,
                           fixed-width (no Huffman)
    +Huffman               the pipeline's own export/packed file (compressed_bytes)
    (+Huffman, fp32 biases) the same model and file, biases stored fp32: what fp16 biases save

Bytes, ratio (trained size_bytes / bytes) and accuracy: mean +- std over the seeds, then
every seed. Latency: the packed model (as the pipeline passes it on, rebuilt dense from the
file) against the trained fp32 model, timed interleaved round by round in one window
(compressflow.timing) at batch 1 and 64; the speedup is trained ms / packed ms per round, its
median and IQR over the rounds of every seed: what the smaller file buys in speed on torch's
dense CPU kernels. Every packed file is read back and checked to rebuild its model exactly. The
paper's LeNet-300-100: 1070 KB -> 27 KB, 40x, error 1.64% -> 1.58%.

    .venv/bin/python benchmarks/deep_compression.py              # seeds 0-4
    .venv/bin/python benchmarks/deep_compression.py --seeds 3 --set stages.1.prune.steps=8

Never asserts (on time or anything else); timings are printed for information only (the
time per seed is the wall clock of one whole pipeline run, training included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "pipelines" / "deep-compression-digits.yaml"
STAGES = {"trained": "trained", "pruned": "finetuned", "shared": "shared", "packed": "packed"}
# batch -> (timed rounds, calls per timing): the MLP takes tens of microseconds a call
LATENCY = {1: (100, 10), 64: (100, 2)}


def packed_latency(trained, packed, example) -> dict[str, list[float]]:
    """Per-round trained ms / packed ms, and each model's ms, at batch 1 and 64, on
    ``example(batch)``: real evaluated inputs of the pipeline's own data."""
    from compressflow.timing import time_models

    figures: dict[str, list[float]] = {}
    for batch, (rounds, number) in LATENCY.items():
        timings = time_models({"trained": trained, "packed": packed}, example(batch),
                              rounds=rounds, number=number, warmup=5, threads=None)
        figures[f"speedup_b{batch}"] = timings.ratios("trained", "packed")
        figures[f"trained_ms_b{batch}"] = timings.samples["trained"]
        figures[f"packed_ms_b{batch}"] = timings.samples["packed"]
    return figures


def run_seed(pipeline: Path, seed: int, overrides: list[str], folder: Path) -> dict[str, dict]:
    """One pipeline run; returns each row's bytes and accuracy."""
    import torch

    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner
    from compressflow_export.packed import PackOptions, load_packed, save_packed

    # the pipeline as it is (its relative data paths start at its folder), with this seed;
    # models stay in memory here, and latency is the benchmark's own, interleaved
    plan = validate(pipeline, [f"seed={seed}", "tracking.log_models=false",
                               "measure.latency=false", *overrides])
    runner = PipelineRunner(plan, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                            experiment=f"deep-compression-seed{seed}")
    ctx = runner.run()
    results, models = ctx.results, runner.models
    accuracy = {row: results[stage].metrics["accuracy"] for row, stage in STAGES.items()}

    def packed(stage: str, options: PackOptions, name: str) -> int:
        path = folder / f"{name}.cfpk"
        report = save_packed(models[stage], path, options)
        rebuilt = load_packed(path, like=models["input"])
        for a, b in zip(models[stage].state_dict().values(), rebuilt.state_dict().values()):
            if not torch.equal(a, b):
                raise RuntimeError(f"{name}: the packed file does not rebuild the model")
        return report.total

    return {
        "trained fp32": {"bytes": results["trained"].metrics["size_bytes"],
                         "accuracy": accuracy["trained"]},
        "pruning only": {"bytes": packed(STAGES["pruned"], PackOptions(
            codebook=False, huffman=False, fp16=False), "pruned"), "accuracy": accuracy["pruned"]},
        "+quantization": {"bytes": packed(STAGES["shared"], PackOptions(huffman=False), "quant"),
                          "accuracy": accuracy["shared"]},
        "+Huffman": {"bytes": results["packed"].metrics["compressed_bytes"],
                     "accuracy": accuracy["packed"]},
        "(+Huffman, fp32 biases)": {"bytes": packed(STAGES["shared"], PackOptions(fp16=False),
                                                    "fp32-biases"), "accuracy": accuracy["packed"]},
        # what rounding the biases to fp16 values did to the accuracy, in the kmeans stage
        "_bias_fp16_delta": results["shared"].metrics.get("bias_fp16_accuracy_delta", 0.0),
        "_latency": packed_latency(models[STAGES["trained"]], models[STAGES["packed"]],
                                   runner.measurer.example),
        "_nonzero": results["packed"].metrics["params_nonzero"],
    }


def run_seeds(pipeline: Path, seeds: int, overrides: list[str], first: int = 0
              ) -> tuple[list[dict], list[float]]:
    """:func:`run_seed` for seeds first..first+seeds-1, each in its own temporary folder and
    store; returns each seed's rows and wall time, printing a line a seed."""
    per_seed, timings = [], []
    for seed in range(first, first + seeds):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="deep-compression-") as folder:
            here = Path.cwd()
            os.chdir(folder)  # MLflow's ./mlruns artifact folder goes with the temporary store
            try:
                per_seed.append(run_seed(pipeline, seed, overrides, Path(folder)))
            finally:
                os.chdir(here)
        timings.append(time.perf_counter() - start)
        row = per_seed[-1]
        print(f"{pipeline.stem} seed {seed}: {int(row['+Huffman']['bytes']):,} bytes, "
              f"{row['trained fp32']['bytes'] / row['+Huffman']['bytes']:.1f}x, accuracy "
              f"{row['trained fp32']['accuracy']:.4f} -> {row['+Huffman']['accuracy']:.4f} "
              f"({timings[-1]:.0f} s)", flush=True)
    return per_seed, timings


def mean_std(values: list[float], fmt: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} +- {format(spread, fmt.lstrip('+'))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--pipeline", type=Path, default=PIPELINE)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="pipeline override, as `compressflow run --set`")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared machine; training is tiny)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    per_seed, timings = run_seeds(args.pipeline.resolve(), args.seeds, args.overrides)

    rows = [name for name in per_seed[0] if not name.startswith("_")]
    print(f"\n{args.pipeline.name}, {args.seeds} seeds (mean +- std)\n")
    print(f"| {'':24} | {'bytes':>17} | {'ratio':>13} | {'accuracy':>17} | {'drop (pt)':>13} |")
    print(f"|{'-' * 26}|{'-' * 18}:|{'-' * 14}:|{'-' * 18}:|{'-' * 14}:|")
    for name in rows:
        size = [s[name]["bytes"] for s in per_seed]
        ratio = [s["trained fp32"]["bytes"] / s[name]["bytes"] for s in per_seed]
        acc = [s[name]["accuracy"] for s in per_seed]
        drop = [100 * (s["trained fp32"]["accuracy"] - s[name]["accuracy"]) for s in per_seed]
        print(f"| {name:24} | {mean_std(size, ',.0f'):>17} | {mean_std(ratio, '.1f'):>13} | "
              f"{mean_std(acc, '.4f'):>17} | {mean_std(drop, '.2f'):>13} |")
    print("\nper seed: bytes / ratio / accuracy")
    print("| seed | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for seed, s in enumerate(per_seed):
        cells = [f"{s[n]['bytes']:,} / {s['trained fp32']['bytes'] / s[n]['bytes']:.1f}x / "
                 f"{s[n]['accuracy']:.4f}" for n in rows]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    huffman = [s["trained fp32"]["bytes"] / s["+Huffman"]["bytes"] for s in per_seed]
    drops = [100 * (s["trained fp32"]["accuracy"] - s["+Huffman"]["accuracy"]) for s in per_seed]
    print(f"\ngoal >= 40x at <= 0.5 pt: min ratio {min(huffman):.1f}x, max drop {max(drops):.2f} pt "
          f"({'met' if min(huffman) >= 40 and max(drops) <= 0.5 else 'NOT met'} on every seed)")
    bias = [100 * s["_bias_fp16_delta"] for s in per_seed]
    print(f"fp16 biases (kmeans stage, bias_fp16): accuracy change {mean_std(bias, '+.2f')} pt "
          f"(per seed: {', '.join(f'{b:+.2f}' for b in bias)})")
    from compressflow.timing import Spread

    def pooled(key: str) -> Spread:
        return Spread.of(list(chain.from_iterable(s["_latency"][key] for s in per_seed)))

    for batch in LATENCY:
        speedup = pooled(f"speedup_b{batch}")
        print(f"latency b{batch}, packed vs trained fp32 (timed interleaved, {args.threads} "
              f"thread(s)): {speedup.median:.2f}x (IQR {speedup.q1:.2f}-{speedup.q3:.2f}); "
              f"trained {pooled(f'trained_ms_b{batch}').median:.4f} ms, packed "
              f"{pooled(f'packed_ms_b{batch}').median:.4f} ms (medians over the rounds of "
              "every seed; the packed model is rebuilt as dense fp32 layers)")
    print(f"time per seed: {statistics.mean(timings):.0f} s (information only)")


if __name__ == "__main__":
    main()
