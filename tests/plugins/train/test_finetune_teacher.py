"""finetune with ``teacher``: distillation as recovery after pruning (or refused after quantizing).

The KD term is compressflow_distill's one implementation; pruned zeros stay exactly zero.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compressflow import DataSpec, StageContext
from compressflow.training import TrainParams, fit, zero_masks
from compressflow_data.loaders import load_digits_bundle
from compressflow_tasks import accuracy
from compressflow_models import zoo
from compressflow_train import Finetune
from tests.conftest import write_pipeline


@pytest.fixture(scope="module")
def setting():
    """Digits; a trained 64-64-10 teacher; a copy of it with 70% of each layer's weights zeroed."""
    bundle = load_digits_bundle(DataSpec(dataset="digits"), 0, None)
    torch.manual_seed(0)
    teacher = zoo.MLP(64, [64], 10)
    fit(teacher, bundle, TrainParams(epochs=8, lr=0.003), _context(bundle, {}))
    pruned = copy.deepcopy(teacher)
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, torch.nn.Linear):
                cut = module.weight.abs().flatten().kthvalue(int(0.7 * module.weight.numel())).values
                module.weight[module.weight.abs() <= cut] = 0
    return bundle, teacher.eval(), pruned


def _context(bundle, models):
    return StageContext(
        name="tune", seed=7, workdir=Path(tempfile.gettempdir()), metric="accuracy",
        data=lambda: bundle, evaluate=lambda m, loader=None: {"accuracy": accuracy(m, bundle.val)},
        model_at=lambda ref: copy.deepcopy(models[ref]), build_model=lambda spec: None,
        log_metric=lambda *a: None, progress=lambda *a: None)


def _finetune(setting, **params):
    """The finetune stage on a copy of the pruned model; fresh loaders: the same batch order."""
    _, teacher, pruned = setting
    bundle = load_digits_bundle(DataSpec(dataset="digits"), 0, None)
    stage = Finetune("tune", Finetune.Params(epochs=5, lr=0.003, **params))
    return stage.run(copy.deepcopy(pruned), _context(bundle, {"base": teacher})).model


def _kl_to(teacher, model, inputs, temperature: float) -> float:
    """How far ``model``'s softened predictions are from the teacher's: KL(teacher || model)."""
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(model(inputs) / temperature, 1),
                              F.softmax(teacher(inputs) / temperature, 1), reduction="batchmean"))


def test_teacher_changes_the_result_and_pulls_it_toward_the_teacher(setting):
    bundle, teacher, pruned = setting
    plain = _finetune(setting)
    taught = _finetune(setting, teacher="base", alpha=1.0, temperature=4)
    assert not torch.equal(plain.layers[0].weight, taught.layers[0].weight)
    inputs = bundle.example_input(len(bundle.val.dataset))
    # alpha=1: the labels play no part, only the teacher's softened outputs, which the taught
    # model matches far better on held-out inputs (measured: 0.011 against 0.027)
    assert _kl_to(teacher, taught, inputs, 4) < 0.6 * _kl_to(teacher, plain, inputs, 4)
    assert accuracy(taught, bundle.val) > accuracy(pruned, bundle.val) + 0.03
    # the same stage with alpha=0 is the plain cross-entropy finetune, bit for bit
    labels_only = _finetune(setting, teacher="base", alpha=0.0)
    assert torch.equal(labels_only.layers[0].weight, plain.layers[0].weight)


def test_zeros_stay_exactly_zero_with_a_teacher(setting):
    _, _, pruned = setting
    taught = _finetune(setting, teacher="base", alpha=0.7)
    before, after = zero_masks(pruned), zero_masks(taught)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
        assert float(before[name].float().mean()) < 0.35
    loose = _finetune(setting, teacher="base", alpha=0.7, keep_zeros=False)
    assert not torch.equal(zero_masks(loose)["layers.0.weight"], before["layers.0.weight"])


def test_a_quantized_model_is_refused_with_a_clear_error(setting):
    from compressflow_quantize.dynamic import quantize_dynamic_int8

    bundle, teacher, _ = setting
    quantized, _ = quantize_dynamic_int8(copy.deepcopy(teacher), [])
    stage = Finetune("tune", Finetune.Params(epochs=1, teacher="base"))
    with pytest.raises(ValueError, match=r"quantized \(torch.ao int8 modules: layers.0, layers.2\)"):
        stage.run(quantized, _context(bundle, {"base": teacher}))


def test_pipeline_prune_then_recover_from_the_unpruned_model(tmp_path, store, cli):
    from mlflow.tracking import MlflowClient

    stages = [{"name": "base", "train": {"epochs": 6, "lr": 0.003}},
              {"name": "pruned", "prune": {"sparsity": 0.9}},
              {"name": "recovered", "finetune": {"epochs": 3, "lr": 0.003, "teacher": "base",
                                                 "alpha": 0.9, "temperature": 4}}]
    path = write_pipeline(tmp_path, stages, name="recover", measure={"latency": False},
                          tracking={"log_models": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("recover").experiment_id])
    metrics = {r.info.run_name: r.data.metrics for r in runs}
    params = {r.info.run_name: r.data.params for r in runs}
    assert params["recovered"]["teacher"] == "base"
    assert metrics["recovered"]["params_nonzero"] == metrics["pruned"]["params_nonzero"]
    assert metrics["recovered"]["sparsity"] == pytest.approx(metrics["pruned"]["sparsity"])
    assert metrics["recovered"]["accuracy"] > metrics["pruned"]["accuracy"]


@pytest.mark.parametrize("teacher", ["later", "nowhere"])
def test_a_teacher_that_names_no_earlier_stage_is_refused_at_validate(tmp_path, store, cli, teacher):
    stages = [{"name": "tuned", "finetune": {"epochs": 1, "teacher": teacher}},
              {"name": "later", "train": {"epochs": 1}}]
    result = cli("run", write_pipeline(tmp_path, stages), "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2
    assert f"stage 'tuned' (finetune/supervised): teacher '{teacher}' names no earlier stage" in result.stderr
    assert "input, previous" in result.stderr
    assert not Path(store.removeprefix("sqlite:///")).exists()  # nothing ran, nothing logged
