"""quantize/auto: every int8 candidate that applies is measured on this machine (torchao's
included), the table is logged, and the choice is the fastest one within the drop in it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressflow_quantize.auto import (
    FAILED,
    NOT_APPLICABLE,
    NOT_LOGGABLE,
    NOT_MEASURABLE,
    OK,
    Candidate,
    choose,
    mark_eligible,
    parse_table,
)
from tests.conftest import write_pipeline
from tests.plugins.quantize.digits_models import (
    digits,
    evaluate,
    save_trained,
    stage_context,
)

MAX_DROP = 0.01


def test_choice_is_the_fastest_candidate_within_the_drop():
    rows = [
        Candidate("fp32", metric=0.97, latency_ms_b1=1.0, latency_ms_b64=9.0),
        Candidate("dynamic-int8", metric=0.95, latency_ms_b1=0.2, latency_ms_b64=2.0),  # drops 2 pt
        Candidate("static-int8", metric=0.965, latency_ms_b1=0.5, latency_ms_b64=1.0),
        Candidate("torchao-int8-dynamic", status=NOT_LOGGABLE, metric=0.97, latency_ms_b1=0.1,
                  latency_ms_b64=0.5),
        Candidate("other", status=FAILED),
        Candidate("unmeasurable", status=NOT_MEASURABLE, metric=0.97, latency_ms_b1=0.05),
    ]
    mark_eligible(rows, 0.97, True, MAX_DROP)
    assert [c.eligible for c in rows] == [True, False, True, False, False, False]
    assert choose(rows, "latency_b1").name == "static-int8"
    for row in rows:
        row.chosen = False
    mark_eligible(rows, 0.97, True, 0.05)  # a looser budget lets the fastest in
    assert choose(rows, "latency_b1").name == "dynamic-int8"
    for row in rows:
        row.chosen = False
    assert choose(rows, "latency_b64").name == "static-int8"
    # a metric where lower is better (a loss): a rise is the drop
    losses = [Candidate("fp32", metric=0.10, latency_ms_b1=1.0), Candidate("x", metric=0.12, latency_ms_b1=0.1)]
    mark_eligible(losses, 0.10, False, 0.01)
    assert losses[1].drop == pytest.approx(0.02) and not losses[1].eligible


def test_candidates_that_fail_or_do_not_apply_are_listed_not_fatal(tmp_path):
    from compressflow_quantize import AutoQuantize

    class ConvOnly(nn.Module):  # no Linear: the dynamic candidates do not apply
        def __init__(self):
            super().__init__()
            self.input_shape = (1, 8, 8)
            self.conv = nn.Conv2d(1, 10, 8)

        def forward(self, x):
            return self.conv(x.view(-1, 1, 8, 8)).flatten(1)

    class Branchy(ConvOnly):  # data-dependent control flow: FX cannot trace it
        def forward(self, x):
            out = super().forward(x)
            return out if bool(out.sum() > 0) else -out

    bundle = digits(True)
    params = AutoQuantize.Params(repeats=3, warmup=1, rounds=1)
    for model, static_status in ((ConvOnly(), OK), (Branchy(), FAILED)):
        logged: dict = {}
        result = AutoQuantize("auto", params).run(model.eval(), stage_context(tmp_path, bundle, logged))
        table = {c["candidate"]: c for c in parse_table(result.artifacts["quantize_auto"].read_text())}
        assert list(table) == ["fp32", "dynamic-int8", "static-int8", "torchao-int8-dynamic"]
        assert table["dynamic-int8"]["status"] == table["torchao-int8-dynamic"]["status"] == NOT_APPLICABLE
        assert table["static-int8"]["status"] == static_status
        if static_status == FAILED:
            assert "trace" in table["static-int8"]["error"].lower()
            assert table["static-int8"]["latency_ms_b1"] == ""
            assert table["fp32"]["chosen"] == "**yes**"
        assert "auto.fp32.latency_ms_b1" in logged
        assert result.model is not None


@pytest.fixture(scope="module")
def trained_mlp_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    return folder, save_trained(folder, "mlp")


def test_auto_pipeline_logs_its_table_and_chooses_by_it(cli, store, trained_mlp_folder):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    folder, model = trained_mlp_folder
    stage = {"name": "auto", "quantize": {"method": "auto", "max_metric_drop": MAX_DROP,
                                          "repeats": 10, "rounds": 2}}
    path = write_pipeline(folder, [stage], name="auto-mlp", model=model)
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("auto-mlp")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'auto'")
    (start,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'input'")
    folder_out = client.download_artifacts(run.info.run_id, "", str(folder / "artifacts"))
    table = {row["candidate"]: row for row in parse_table(open(f"{folder_out}/quantize_auto.md").read())}
    report = json.loads(open(f"{folder_out}/quantize_auto.json").read())
    rows = {c["name"]: c for c in report["candidates"]}

    # every int8 candidate applies to an MLP and was measured here, torchao's included
    assert set(table) == set(rows) == {"fp32", "dynamic-int8", "static-int8", "torchao-int8-dynamic"}
    for name, row in rows.items():
        assert row["status"] in (OK, FAILED, NOT_LOGGABLE, NOT_MEASURABLE)
        if row["status"] != OK:
            assert row["error"], name
            assert row["status"] != FAILED or name == "torchao-int8-dynamic"  # torch.ao's run here
        if row["status"] != FAILED:
            assert row["latency_ms_b1"] > 0 and row["latency_ms_b64"] > 0
            assert float(table[name]["latency_ms_b1"]) == pytest.approx(row["latency_ms_b1"], abs=1e-4)
            # the per-candidate figures were logged to the stage's run, the same ones
            logged = run.data.metrics[f"auto.{name}.latency_ms_b1"]
            assert logged == pytest.approx(row["latency_ms_b1"])
            assert run.data.metrics[f"auto.{name}.accuracy"] == pytest.approx(row["metric"])

    # the choice, recomputed from the logged table: fastest at batch 1 within the drop
    baseline = start.data.metrics["accuracy"]
    within = {n: r for n, r in rows.items()
              if r["status"] == OK and r["metric"] is not None and baseline - r["metric"] <= MAX_DROP + 1e-12}
    expected = min(within, key=lambda n: within[n]["latency_ms_b1"])
    assert report["chosen"] == expected
    assert [n for n, r in table.items() if r["chosen"] == "**yes**"] == [expected]
    assert [n for n, r in table.items() if r["eligible"] == "yes"] == sorted(within, key=list(table).index)
    notes = open(f"{folder_out}/notes.txt").read()
    assert notes.startswith(f"auto chose {expected}:")

    # the chosen model is what was logged: it reloads and reproduces the stage's accuracy
    mlflow.set_tracking_uri(store)
    model = mlflow.pytorch.load_model(run.data.tags["compressflow.model_uri"])
    assert evaluate(model, digits(False).val)["accuracy"] == pytest.approx(run.data.metrics["accuracy"])
    assert run.data.metrics["accuracy"] == pytest.approx(rows[expected]["metric"])
    kinds = {type(m).__module__ for m in model.modules()}
    if expected == "fp32":
        assert any(type(m) is nn.Linear for m in model.modules())
    elif expected == "dynamic-int8":
        assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    elif expected == "static-int8":
        assert isinstance(model, torch.fx.GraphModule)
    else:
        assert any(type(p).__module__.startswith("torchao") for p in model.parameters())
