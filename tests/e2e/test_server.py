"""A shared tracking server: ``mlflow server`` over a real PostgreSQL cluster, serving its
artifacts, both started here on loopback. Two pipelines run against it at once; compare,
reuse, the registry alias and a registered model as a source all go through the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_pipeline
from tests.servers import mlflow_server, postgres, postgres_bin

pytestmark = pytest.mark.skipif(postgres_bin() is None,
                                reason="PostgreSQL is not installed (.ci/run installs it)")
COMPRESSFLOW = str(Path(sys.executable).with_name("compressflow"))


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    pytest.importorskip("psycopg")
    folder = tmp_path_factory.mktemp("server")
    with postgres() as database, mlflow_server(database, folder / "artifacts") as url:
        yield url


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([COMPRESSFLOW, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def small(folder: Path, name: str, sparsity: float, **extra) -> Path:
    stages = [{"name": "baseline", "train": {"epochs": 2, "lr": 0.01}},
              {"name": "pruned", "prune": {"method": "magnitude", "sparsity": sparsity}}]
    return write_pipeline(folder, stages, name=name, tracking={"experiment": "shared"}, **extra)


def test_two_pipelines_at_once_then_compare_reuse_and_the_registry_through_the_server(server, tmp_path):
    first = small(tmp_path, "team-a", 0.5)
    second = small(tmp_path, "team-b", 0.8, register={"name": "team-mlp", "alias": "champion"})
    runs = [subprocess.Popen([COMPRESSFLOW, "run", str(path), "--tracking-uri", server, "--quiet"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
            for path in (first, second)]
    for process in runs:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, out + err
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()  # nothing local

    compared = cli("compare", "shared", "--tracking-uri", server, "--json", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    rows = {row["run_name"]: row for row in json.loads(compared.stdout)}
    assert {name.split("-")[0] + "-" + name.split("-")[1] for name in rows} == {"team-a", "team-b"}, rows.keys()
    assert all(row["status"] == "FINISHED" and row["metric"] > 0.5 for row in rows.values())

    # the same pipeline again with --reuse: every stage found through the server
    again = cli("run", first, "--tracking-uri", server, "--reuse", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    import mlflow

    mlflow.set_tracking_uri(server)
    latest = mlflow.search_runs(experiment_names=["shared"], filter_string="tags.mlflow.runName = 'pruned'",
                                order_by=["attributes.start_time DESC"])
    # (team-b's pruned run has another sparsity, so another key: only team-a's can match)
    assert latest.iloc[0]["tags.compressflow.reused_from"] in set(latest["run_id"][1:])

    # the registry alias, read back, and the registered model as the next pipeline's source
    version = mlflow.MlflowClient().get_model_version_by_alias("team-mlp", "champion")
    assert version.version == "1"
    follow = write_pipeline(tmp_path, [{"name": "pruned-more", "prune": {"sparsity": 0.9}}], name="team-c",
                            model={"source": "mlflow:models:/team-mlp@champion"}, tracking={"experiment": "shared"})
    third = cli("run", follow, "--tracking-uri", server, "--quiet", cwd=tmp_path)
    assert third.returncode == 0, third.stderr


def test_a_server_that_goes_away_fails_the_run_clearly_and_resume_finishes_it(tmp_path):
    pytest.importorskip("psycopg")
    import time

    import mlflow

    stages = [{"name": "baseline", "train": {"epochs": 2, "lr": 0.01}},
              {"name": "slow", "finetune": {"epochs": 90}},  # still training when the server stops
              {"name": "pruned", "prune": {"sparsity": 0.5}}]
    path = write_pipeline(tmp_path, stages, name="outage", measure={"latency": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with postgres() as database:
        port = None
        with mlflow_server(database, tmp_path / "artifacts") as url:
            port = int(url.rsplit(":", 1)[1])
            run = subprocess.Popen([COMPRESSFLOW, "run", str(path), "--tracking-uri", url, "--quiet"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            mlflow.set_tracking_uri(url)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # the baseline is logged; the slow stage trains
                done = mlflow.search_runs(experiment_names=["outage"],
                                          filter_string="tags.mlflow.runName = 'baseline' and attributes.status = 'FINISHED'")
                if len(done):
                    break
                time.sleep(1)
            assert len(done), "the baseline stage never finished"
        stopped = time.monotonic()
        out, err = run.communicate(timeout=300)
        assert run.returncode != 0
        assert time.monotonic() - stopped < 120  # a clear failure in about a minute, not a hang
        assert "Traceback" not in err, err
        assert "tracking server" in err or "MLflow" in err, err

        with mlflow_server(database, tmp_path / "artifacts", port=port) as url:
            resumed = subprocess.run([COMPRESSFLOW, "run", str(path), "--tracking-uri", url, "--resume", "--quiet"],
                                     cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            runs = mlflow.search_runs(experiment_names=["outage"], filter_string="attributes.status = 'FINISHED'")
            names = list(runs["tags.mlflow.runName"])
            assert names.count("baseline") == 1  # kept from before the outage, not trained again
            assert {"slow", "pruned"} <= set(names)
