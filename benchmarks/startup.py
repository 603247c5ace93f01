"""Startup cost of the compressflow command against the cost of importing torch.

Measures the wall time of `compressflow --help` and `compressflow validate
pipelines/quickstart.yaml` against `python -c "import torch"` (and `python -c pass`, the
interpreter's floor), each a fresh subprocess: one warm-up round, then N rounds with the
commands alternating, median and min per command. Then, in one fresh process per command, it
runs the command in-process through typer's CliRunner under `python -X importtime` and reports
whether torch / mlflow got imported, and the heaviest top-level packages it imported.

    .venv/bin/python benchmarks/startup.py            # N = 7
    .venv/bin/python benchmarks/startup.py -n 15

Goals: help / torch <= 0.3 and validate / torch <= 1.0 (medians). Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin (not resolved: that would leave the venv)
PIPELINE = "pipelines/quickstart.yaml"
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "compressflow --help": [str(BIN / "compressflow"), "--help"],
    "compressflow validate": [str(BIN / "compressflow"), "validate", PIPELINE],
}
WATCHED = ("torch", "mlflow", "sklearn", "pandas", "numpy", "pydantic", "rich", "typer", "pluggy",
           "yaml")
IN_PROCESS = """
import json, sys
from typer.testing import CliRunner
from compressflow.cli import app
result = CliRunner().invoke(app, {args!r})
print(json.dumps({{"exit": result.exit_code, "output": result.output[-300:],
                  "loaded": {{m: m in sys.modules for m in {watched!r}}}}}))
"""


def time_once(argv: list[str]) -> float:
    """Wall seconds of one fresh subprocess running ``argv`` in the repo root (must exit 0)."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def heaviest_imports(stderr: str, top: int) -> list[tuple[str, float]]:
    """The ``top`` top-level packages (no dot) by cumulative import ms, from -X importtime."""
    found = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        name = name.strip()
        if "." not in name and cumulative.strip().isdigit() and name not in found:
            found[name] = int(cumulative) / 1000.0
    return sorted(found.items(), key=lambda item: -item[1])[:top]


def imports_of(args: list[str], top: int = 8) -> dict:
    """Run the CLI with ``args`` in a fresh process, in-process via CliRunner, under importtime."""
    code = IN_PROCESS.format(args=args, watched=WATCHED)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"in-process {args} failed:\n{done.stdout[-1000:]}\n{done.stderr[-2000:]}")
    report = json.loads(lines[-1])
    report["heaviest"] = heaviest_imports(done.stderr, top)
    return report


def main() -> None:
    """Time every command, print the table, the goal ratios and what each command imports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=7, help="timed rounds after warm-up")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.2f}; fresh subprocess per call, 1 warm-up round, "
          f"{args.rounds} timed rounds, commands alternating, cwd {REPO}")
    for argv in COMMANDS.values():  # warm-up: page cache, .pyc files
        time_once(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            times[name].append(time_once(argv))
    med = {name: statistics.median(values) for name, values in times.items()}
    torch_s = med["import torch"]
    print(f"load avg after: {os.getloadavg()[0]:.2f}\n")
    print(f"{'command':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'/ import torch':>15}")
    for name, values in times.items():
        print(f"{name:<24} {med[name]:9.3f} {min(values):7.3f} {max(values):7.3f} "
              f"{med[name] / torch_s:15.3f}")
    help_ratio = med["compressflow --help"] / torch_s
    validate_ratio = med["compressflow validate"] / torch_s
    print(f"\nhelp / torch:     {help_ratio:.3f}  (goal <= 0.3: {'met' if help_ratio <= 0.3 else 'NOT met'})")
    print(f"validate / torch: {validate_ratio:.3f}  (goal <= 1.0: "
          f"{'met' if validate_ratio <= 1.0 else 'NOT met'})")
    print("\nwhat each command imports (in-process via typer's CliRunner, fresh process each):")
    for label, cli_args in (("--help", ["--help"]), ("validate", ["validate", PIPELINE])):
        report = imports_of(cli_args)
        loaded = report["loaded"]
        print(f"  compressflow {label:<9} exit {report['exit']}  torch imported: {loaded['torch']}, "
              f"mlflow imported: {loaded['mlflow']}")
        print("    also loaded: " + (", ".join(m for m in WATCHED[2:] if loaded[m]) or "none"))
        print("    heaviest top-level imports (cumulative ms, nested ones overlap): "
              + ", ".join(f"{name} {ms:.0f}" for name, ms in report["heaviest"]))


if __name__ == "__main__":
    main()
