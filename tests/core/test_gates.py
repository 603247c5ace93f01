"""Quality gates: pass, stop (exit 3) and continue."""

from __future__ import annotations

from compressflow.config import GateSpec
from compressflow.gates import gate_failures
from tests.conftest import write_pipeline


def test_gate_arithmetic():
    reference = {"accuracy": 0.95, "size_bytes": 4000, "latency_ms_b1": 1.0}
    figures = {"accuracy": 0.93, "size_bytes": 1000, "compressed_bytes": 500, "latency_ms_b1": 0.5}
    assert gate_failures(GateSpec(max_metric_drop=0.03, min_size_ratio=8), figures, reference, "accuracy", True) == []
    failures = gate_failures(GateSpec(max_metric_drop=0.01, min_size_ratio=10, max_latency_ms_b1=0.4),
                             figures, reference, "accuracy", True)
    assert len(failures) == 3 and "dropped by 0.0200" in failures[0] and "8.00x" in failures[1]
    # a loss is better lower: a rise is the drop
    assert gate_failures(GateSpec(max_metric_drop=0.1), {"loss": 0.5}, {"loss": 0.2}, "loss", False)


def _gated(tmp_path, gate):
    return write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 3, "lr": 0.01}},
                                     {"name": "cut", "prune": {"sparsity": 0.95}, "gate": gate},
                                     {"name": "after", "finetune": {"epochs": 1}}],
                          measure={"latency": False})


def _statuses(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return {r.info.run_name: (r.info.status, r.data.tags.get("compressflow.gate")) for r in runs}


def test_gate_failure_stops_with_exit_3(tmp_path, cli, store):
    result = cli("run", _gated(tmp_path, {"max_metric_drop": 0.01, "against": "base"}),
                 "--tracking-uri", store, "--quiet")
    assert result.exit_code == 3
    assert "stage 'cut' failed its gate against 'base'" in result.stderr and "accuracy dropped by" in result.stderr
    statuses = _statuses(store)
    assert statuses["cut"] == ("FINISHED", "failed") and "after" not in statuses
    assert statuses["test"] == ("FAILED", "failed")


def test_gate_continue_and_pass(tmp_path, cli, store):
    result = cli("run", _gated(tmp_path, {"max_metric_drop": 0.01, "against": "base", "on_fail": "continue"}),
                 "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0 and "gate failed" in result.stdout
    assert _statuses(store)["after"][0] == "FINISHED"
    passing = write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 1}},
                                        {"prune": {"sparsity": 0.1}, "gate": {"max_metric_drop": 0.5, "against": "previous"}}],
                             name="ok")
    assert cli("run", passing, "--tracking-uri", store, "--quiet").exit_code == 0


def test_gate_against_unknown_stage_is_bad_input(tmp_path, cli):
    result = cli("validate", _gated(tmp_path, {"max_metric_drop": 0.01, "against": "bse"}))
    assert result.exit_code == 2 and "did you mean 'base'" in result.stderr
