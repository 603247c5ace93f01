"""Pareto fronts on hand-made points, the compare command, and the registry round trip."""

from __future__ import annotations

import json

from compressflow.compare import Row, mark_pareto, select
from tests.conftest import write_pipeline


def _row(name, metric, cost, status="FINISHED", gate="passed"):
    return Row(run_id=name, run_name=name, status=status, gate=gate, metric=metric, cost=cost,
               figures={"size_bytes": cost, "latency_ms_b1": 1.0})


def test_pareto_front_and_selection():
    rows = [_row("big-best", 0.98, 1000), _row("mid", 0.97, 400), _row("dominated", 0.96, 500),
            _row("tiny", 0.90, 100), _row("tie", 0.97, 400), _row("gated", 0.99, 50, gate="failed"),
            _row("failed", 0.99, 10, status="FAILED")]
    front = {r.run_name for r in mark_pareto(rows) if r.pareto}
    assert front == {"big-best", "mid", "tie", "tiny"}
    assert select(rows, 0.0, "smallest").run_name == "big-best"
    assert select(rows, 0.01, "smallest").run_name in {"mid", "tie"}
    assert select(rows, 0.1, "smallest").run_name == "tiny"
    # a loss: lower is better
    losses = [_row("a", 0.1, 100), _row("b", 0.2, 50), _row("c", 0.3, 60)]
    assert {r.run_name for r in mark_pareto(losses, higher_is_better=False) if r.pareto} == {"a", "b"}


def test_compare_command_and_registry_round_trip(tmp_path, cli, store):
    stages = [{"name": "base", "train": {"epochs": 2, "lr": 0.01}}, {"prune": {"sparsity": 0.5}}]
    first = write_pipeline(tmp_path, stages, name="a", tracking={"experiment": "cmp"},
                           register={"name": "digits-small", "alias": "champion"})
    assert cli("run", first, "--tracking-uri", store, "--quiet").exit_code == 0
    second = write_pipeline(tmp_path, [stages[0], {"quantize": {}}], name="b", tracking={"experiment": "cmp"})
    assert cli("run", second, "--tracking-uri", store, "--quiet").exit_code == 0

    plot = tmp_path / "front.png"
    result = cli("compare", "cmp", "--tracking-uri", store, "--json", "--plot", plot)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    a, b = rows
    assert (a["run_name"], b["run_name"]) == ("a", "b")
    assert b["cost"] < a["cost"] and b["pareto"]  # quantized: smaller on disk
    assert a["pareto"] == (a["metric"] > b["metric"])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = cli("compare", "--tracking-uri", store, "--by", "macs")
    assert table.exit_code == 0 and "Pareto" in table.stdout
    assert cli("compare", "nope", "--tracking-uri", store).exit_code == 2

    # the registered model is a source: continue from models:/name@alias
    again = write_pipeline(tmp_path, [{"finetune": {"epochs": 1}}], name="c",
                           model={"source": "mlflow:models:/digits-small@champion"})
    result = cli("run", again, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    version = client.get_model_version_by_alias("digits-small", "champion")
    runs = client.search_runs([client.get_experiment_by_name("c").experiment_id],
                              filter_string="attributes.run_name = 'input'")
    pruned = client.search_runs([client.get_experiment_by_name("cmp").experiment_id],
                                filter_string="attributes.run_name = '1-prune'")
    assert str(version.version) == "1"
    assert runs[0].data.metrics["accuracy"] == pruned[0].data.metrics["accuracy"]
    assert runs[0].data.metrics["sparsity"] == pruned[0].data.metrics["sparsity"]


def test_compare_ranks_by_the_pipelines_own_metric_and_direction(tmp_path, store, cli):
    """A regression pipeline's compare defaults to its mse, lower being better."""
    import numpy as np

    from tests.conftest import write_pipeline

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    np.savez(tmp_path / "reg.npz", x=x, y=(x @ np.array([1.0, -2.0, 0.5, 0.0]))[:, None])
    path = write_pipeline(tmp_path, [{"train": {"epochs": 2}}], name="reg", task="regression",
                          model={"source": "zoo:mlp", "args": {"in_features": 4, "hidden": [8], "num_classes": 1}},
                          data={"dataset": "npz", "args": {"path": "reg.npz"}})
    assert cli("run", path, "--tracking-uri", store, "--quiet").exit_code == 0
    from compressflow.compare import headline

    assert headline(store, "reg") == ("mse", False)
    result = cli("compare", "reg", "--tracking-uri", store, "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["metric"] == row["figures"]["mse"] and row["pareto"]
