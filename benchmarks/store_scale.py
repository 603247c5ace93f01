"""How the store's two hot reads scale with its size: the stage-reuse lookup
(``Tracker.find_stage``, one per stage of every run) and ``compare`` of one experiment
(``compressflow.compare.load_rows``), on a store filled with N synthetic stage runs.

Stores: a sqlite file, and PostgreSQL (a private cluster started here, tests/servers.py)
read through ``mlflow server`` as a team would. Each is filled directly (MlflowClient on the
database URI) with N stage runs under N / 4 pipeline (parent) runs: the tags, params and
metrics compressflow logs for a stage (its key, kind, method, model URI; ~10 params, ~20
metrics). The experiment ``compare`` reads is one more pipeline of 4 stages among them, so
``compare`` lists one experiment of a big store, and a lookup finds one key among N.

    .venv/bin/python benchmarks/store_scale.py                 # 10,000 runs, both stores
    .venv/bin/python benchmarks/store_scale.py --runs 1000 --stores sqlite

Goal: a lookup <= 50 ms and compare <= 2 s at 10,000 runs. Never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import mlflow_server, postgres  # noqa: E402

FILLER, TARGET = "scale-filler", "scale-target"


def fill(uri: str, runs: int, threads: int = 1) -> str:
    """``runs`` stage runs in the filler experiment, plus one 4-stage pipeline in the target
    one (``compare`` lists it); returns a stage key of the filler to look up. ``threads``
    fill pipelines side by side (a database server; sqlite takes one writer at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ids = {}
    for experiment in (FILLER, TARGET):
        found = client.get_experiment_by_name(experiment)
        ids[experiment] = found.experiment_id if found else client.create_experiment(experiment)
    keys = [uuid.uuid4().hex for _ in range(runs)]
    chunks = [keys[i:i + 4] for i in range(0, runs, 4)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda chunk: _pipeline(client, ids[FILLER], chunk), chunks))
    _pipeline(client, ids[TARGET], [uuid.uuid4().hex for _ in range(4)])
    return keys[runs // 2]


def _pipeline(client, experiment_id: str, keys: list[str]) -> None:
    """One finished pipeline (parent) run with a finished stage run per key."""
    from compressflow.tracking import Tag

    parent = client.create_run(experiment_id, run_name="pipeline", tags={Tag.KIND: "pipeline"})
    for i, key in enumerate(keys):
        run = client.create_run(experiment_id, run_name=f"stage-{i}", tags={
            "mlflow.parentRunId": parent.info.run_id, Tag.STAGE_KEY: key, Tag.KIND: "prune",
            Tag.METHOD: "magnitude", Tag.MODEL_URI: f"runs:/{uuid.uuid4().hex}/model"})
        _log(client, run.info.run_id, i)
        client.set_terminated(run.info.run_id)
    _log(client, parent.info.run_id, len(keys))
    client.set_terminated(parent.info.run_id)


def _log(client, run_id: str, i: int) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"m{j}", (i * 31 + j) % 97 / 97, now, 0) for j in range(18)]
                     + [Metric("accuracy", 0.9, now, 0), Metric("size_bytes", 1e5 + i, now, 0)],
                     params=[Param(f"p{j}", str(j)) for j in range(10)])


def timed(call, repeats: int) -> tuple[float, float]:
    """Median and spread (max - min) of ``call``'s wall time, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times) - min(times)


def measure(uri: str, key: str) -> dict[str, tuple[float, float]]:
    """The lookup (a hit and a miss) and compare, read through ``uri``."""
    from compressflow.compare import load_rows
    from compressflow.tracking import Tracker

    tracker = Tracker(uri, FILLER, log_models=False)
    assert tracker.find_stage(key) is not None, "the filled key was not found"
    rows = load_rows(uri, TARGET)
    assert len(rows) == 1, rows
    return {"lookup hit": timed(lambda: tracker.find_stage(key), 20),
            "lookup miss": timed(lambda: tracker.find_stage(uuid.uuid4().hex), 20),
            "compare": timed(lambda: load_rows(uri, TARGET), 5)}


def run_store(name: str, runs: int, folder: Path) -> dict[str, tuple[float, float]]:
    """Fill and measure one store kind."""
    from compressflow import store

    with contextlib.ExitStack() as stack:
        if name == "sqlite":
            uri = read = f"sqlite:///{folder / 'scale.db'}"
            store.prepare(uri)
        else:
            uri = stack.enter_context(postgres())
            read = stack.enter_context(mlflow_server(uri, folder / "artifacts"))
        start = time.perf_counter()
        key = fill(uri, runs, threads=1 if name == "sqlite" else 8)
        print(f"{name}: filled {runs:,} stage runs in {time.perf_counter() - start:.0f} s", flush=True)
        return measure(read, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stores.split(","):
            results[name] = run_store(name, args.runs, Path(tmp))
    print(f"\n{args.runs:,} stage runs | median ms (spread) | goal")
    print("| store | lookup (hit) | lookup (miss) | compare one experiment |")
    print("|---|---:|---:|---:|")
    for name, figures in results.items():
        cells = [f"{figures[k][0]:.1f} ({figures[k][1]:.1f})" for k in ("lookup hit", "lookup miss", "compare")]
        print(f"| {name if name == 'sqlite' else 'PostgreSQL via mlflow server'} | " + " | ".join(cells) + " |")
    print("| goal | <= 50 | <= 50 | <= 2000 |")


if __name__ == "__main__":
    main()
