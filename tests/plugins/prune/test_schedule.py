"""compressflow_prune's gradual schedule: Zhu & Gupta's cubic targets, hit at every step, with
the shared training loop between steps; a pruned weight never comes back."""

from __future__ import annotations

import pytest
import torch

from compressflow_prune import LeastSquaresPrune, MagnitudePrune
from compressflow_prune.schedule import cubic_targets
from tests.conftest import write_pipeline
from tests.plugins.prune.helpers import linear_weights, run_stage, trained_mlp


def cubic(final: float, initial: float, t: int, steps: int) -> float:
    return final + (initial - final) * (1 - t / steps) ** 3


def test_cubic_targets():
    assert cubic_targets(0.9, 0.0, 3) == pytest.approx([0.9 - 0.9 * 8 / 27, 0.9 - 0.9 / 27, 0.9])
    targets = cubic_targets(0.8, 0.2, 5)
    assert targets == pytest.approx([cubic(0.8, 0.2, t, 5) for t in range(1, 6)])
    assert targets[-1] == 0.8 and all(a < b for a, b in zip([0.2, *targets], targets))
    # steep first, flat at the end: the first step takes about half the way
    assert targets[0] - 0.2 > 0.25 and targets[-1] - targets[-2] < 0.01
    assert cubic_targets(0.5, 0.0, 1) == [0.5]


class Watched(LeastSquaresPrune):
    """least-squares as it is, keeping where the zeros are before and after every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.before, self.after = [], []

    def prune_layers(self, model, layers, plan, batches):
        self.before.append({n: m.weight.detach() == 0 for n, m in layers.items()})
        records = super().prune_layers(model, layers, plan, batches)
        self.after.append({n: m.weight.detach() == 0 for n, m in layers.items()})
        return records


def test_gradual_steps_hit_the_cubic_targets_and_pruned_weights_stay_pruned():
    from tests.plugins.prune.helpers import Recorder

    model, bundle = trained_mlp()
    params = Watched.Params(sparsity=0.8, initial_sparsity=0.2, schedule="gradual", steps=3,
                            finetune_epochs=1, scope="layer", per_layer={"layers.4": 0.5},
                            calibration_batches=4, lr=5e-4)
    stage, ctx = Watched("gradual", params), Recorder(bundle)
    result = stage.run(model, ctx)
    sizes = {n: w.numel() for n, w in linear_weights(result.model).items()}
    finals = {"layers.0": 0.8, "layers.2": 0.8, "layers.4": 0.5}
    for t in range(1, 4):
        zeros = stage.after[t - 1]
        for name, final in finals.items():  # every layer on its own curve, to the weight
            assert int(zeros[name].sum()) == round(cubic(final, 0.2, t, 3) * sizes[name]), (t, name)
        if t > 1:
            for name in finals:
                # the loop between steps kept every zero, and this step pruned them first
                assert torch.equal(stage.before[t - 1][name], stage.after[t - 2][name])
                assert bool(zeros[name][stage.before[t - 1][name]].all())
    overall = [sum(cubic(f, 0.2, t, 3) * sizes[n] for n, f in finals.items()) / sum(sizes.values())
               for t in range(1, 4)]
    # logged at the epochs trained before each step: 0, 1, 2
    assert ctx.history("step_target_sparsity") == [(t, pytest.approx(s)) for t, s in enumerate(overall)]
    assert [v for _, v in ctx.history("step_sparsity")] == pytest.approx(overall, abs=1e-3)
    assert [s for s, _ in ctx.history("pruned_val_accuracy")] == [0, 1, 2]
    # one epoch of the shared loop after each step: its curves continue, its progress counts all
    assert [s for s, _ in ctx.history("train_loss")] == [1, 2, 3]
    assert [s for s, _ in ctx.history("val_accuracy")] == [1, 2, 3]
    assert ctx.progressed == [(1, 3), (2, 3), (3, 3)]
    assert result.metrics["target_sparsity"] == pytest.approx(overall[-1])
    assert result.metrics["reconstruction_error"] < result.metrics["reconstruction_error_magnitude"]


def test_gradual_without_finetune_only_prunes():
    model, bundle = trained_mlp()
    result, ctx = run_stage(MagnitudePrune, model, bundle, sparsity=0.6, schedule="gradual",
                            steps=2, finetune_epochs=0)
    assert ctx.history("train_loss") == []
    assert [s for s, _ in ctx.history("step_target_sparsity")] == [0, 1]
    oneshot, _ = run_stage(MagnitudePrune, trained_mlp()[0], bundle, sparsity=0.6)
    # magnitude without training in between: the same weights go as in one shot
    for name, weight in linear_weights(result.model).items():
        assert torch.equal(weight, linear_weights(oneshot.model)[name])


def test_gradual_pipeline_logs_the_schedule_to_mlflow(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    stages = [{"name": "base", "train": {"epochs": 6, "lr": 0.003}},
              {"name": "gradual", "prune": {"method": "taylor", "sparsity": 0.85, "schedule": "gradual",
                                            "steps": 4, "finetune_epochs": 1, "lr": 0.001,
                                            "calibration_batches": 4}}]
    path = write_pipeline(tmp_path, stages, name="cubic", measure={"latency": False},
                          tracking={"log_models": False})
    ctx = PipelineRunner(validate(path), tracking_uri=store).run()
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("cubic").experiment_id],
                                "attributes.run_name = 'gradual'")
    assert run.info.status == "FINISHED" and run.data.params["schedule"] == "gradual"

    def history(name):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))

    targets = [cubic(0.85, 0.0, t, 4) for t in range(1, 5)]
    assert [s for s, _ in history("step_target_sparsity")] == [0, 1, 2, 3]
    assert [v for _, v in history("step_target_sparsity")] == pytest.approx(targets)
    total = sum(w.numel() for w in linear_weights(ctx.results["gradual"].model).values())
    assert [v for _, v in history("step_sparsity")] == pytest.approx(targets, abs=1 / total)
    assert [s for s, _ in history("train_loss")] == [1, 2, 3, 4]
    zeros = sum(int((w == 0).sum()) for w in linear_weights(ctx.results["gradual"].model).values())
    assert zeros == round(0.85 * total)
    assert run.data.metrics["target_sparsity"] == pytest.approx(0.85)
    # finetuning between steps recovers: the last step's pruning costs less than the first's
    assert ctx.results["gradual"].metrics["accuracy"] > 0.8
