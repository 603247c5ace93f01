"""distill/features: hidden-state distillation with a layer map and learned projections.

A teacher MLP (64-128-64-10) teaches a 64-16-10 student its hidden states on the digits; the
16-wide student layer needs a projection to the teacher's 64, which trains alongside and is
not part of the model the stage returns (nor of the one MLflow holds). For the embedding task,
blocks returning tuples are matched at the attended tokens, and the task term is 1 - cosine to
the teacher's embedding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compressflow import ConfigError, DataSpec, StageContext
from compressflow_data.loaders import load_digits_bundle
from compressflow_distill.features import FeatureKD
from compressflow_tasks import accuracy
from compressflow_models import zoo
from tests.conftest import write_pipeline

TEACHER = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [128, 64], "num_classes": 10}}
STUDENT = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [16], "num_classes": 10}}
FAST = {"measure": {"latency": False}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """teacher -> distill/features (student layers.1 <- teacher layers.3: 16 -> 64 wide)."""
    from typer.testing import CliRunner

    from compressflow.cli import app

    folder = tmp_path_factory.mktemp("features")
    stages = [
        {"name": "teacher", "train": {"epochs": 8, "lr": 0.003}},
        {"name": "student", "distill": {
            "method": "features", "teacher": "teacher", "student": STUDENT,
            "layers": {"layers.1": "layers.3"}, "feature_weight": 1.0, "logits_weight": 0.5,
            "label_weight": 1.0, "epochs": 8, "lr": 0.003}},
    ]
    path = write_pipeline(folder, stages, name="features", model=TEACHER, **FAST)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", uri, "--quiet"])
    assert result.exit_code == 0, result.output
    return uri


def _stage_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("features")
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    return client, run


def test_projection_trains_alongside_and_is_not_in_the_returned_model(pipeline):
    import mlflow.pytorch

    client, run = _stage_run(pipeline, "student")
    # Linear(16 -> 64): 16 * 64 weights + 64 biases, trained, then dropped
    assert run.data.metrics["projection_params"] == 16 * 64 + 64
    notes = client.download_artifacts(run.info.run_id, "notes.txt", tempfile.mkdtemp())
    assert "layers.1 16->64" in Path(notes).read_text()
    mlflow.set_tracking_uri(pipeline)
    student = mlflow.pytorch.load_model(run.data.tags["compressflow.model_uri"])
    fresh = zoo.MLP(64, [16], 10)
    assert list(student.state_dict()) == list(fresh.state_dict())
    assert run.data.metrics["params_total"] == sum(p.numel() for p in fresh.parameters())
    assert not any(isinstance(m, nn.Linear) and m.out_features == 64 for m in student.modules())
    assert not student.layers[1]._forward_hooks  # the capture hooks are gone too
    assert run.data.metrics["accuracy"] > 0.85


def test_feature_loss_decreases_during_training(pipeline):
    client, run = _stage_run(pipeline, "student")
    curve = sorted(client.get_metric_history(run.info.run_id, "train_feature_loss"),
                   key=lambda m: m.step)
    assert [m.step for m in curve] == list(range(1, 9))
    assert curve[-1].value < curve[0].value / 2
    logits = client.get_metric_history(run.info.run_id, "train_logits_loss")
    assert len(logits) == 8  # logits_weight > 0: that term is computed and logged too
    assert run.data.metrics["final_train_feature_loss"] == pytest.approx(curve[-1].value)


def test_bad_layer_name_fails_listing_the_real_names(tmp_path, store, cli):
    stages = [
        {"name": "teacher", "train": {"epochs": 1}},
        {"name": "student", "distill": {"method": "features", "teacher": "teacher",
                                        "student": STUDENT, "layers": {"layers.1": "layer.3"},
                                        "epochs": 1}},
    ]
    path = write_pipeline(tmp_path, stages, model=TEACHER, **FAST,
                          tracking={"log_models": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 1
    assert "teacher layer 'layer.3' is not a module of the teacher (MLP)" in result.stderr
    assert "did you mean 'layers.3'" in result.stderr
    assert "teacher modules: layers, layers.0, layers.1, layers.2, layers.3, layers.4" in result.stderr
    assert "Traceback" not in result.stderr


def test_teacher_that_names_no_earlier_stage_is_refused_before_running(tmp_path, store, cli):
    stages = [{"name": "student", "distill": {"method": "features", "teacher": "teacher",
                                              "layers": {"layers.1": "layers.1"}}},
              {"name": "teacher", "train": {"epochs": 1}}]
    result = cli("run", write_pipeline(tmp_path, stages), "--tracking-uri", store, "--quiet")
    assert result.exit_code == 2
    assert "teacher 'teacher' names no earlier stage" in result.stderr


def test_empty_layer_map_and_all_zero_weights_are_refused(tmp_path, cli):
    empty = [{"distill": {"method": "features", "teacher": "input", "layers": {}}}]
    result = cli("validate", write_pipeline(tmp_path, empty, name="empty"))
    assert result.exit_code == 2 and "layers" in result.stderr
    zero = [{"distill": {"method": "features", "teacher": "input", "layers": {"layers.1": "layers.1"},
                         "feature_weight": 0, "label_weight": 0}}]
    result = cli("validate", write_pipeline(tmp_path, zero, name="zero"))
    assert result.exit_code == 2 and "nothing to learn" in result.stderr


# --- the mechanics, without a pipeline ---------------------------------------------------


def _batch(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, *shape)


def test_equal_widths_need_no_projection():
    student, teacher = zoo.MLP(64, [32], 10), zoo.MLP(64, [64, 32], 10)
    kd = FeatureKD(student, teacher, {"layers.1": "layers.3"}, feature_weight=1,
                   logits_weight=0, label_weight=1, temperature=4)
    try:
        assert kd.probe(student, _batch((64,))) == {}
        assert len(kd.projections) == 0
    finally:
        kd.close()


def test_four_d_features_get_a_1x1_conv_and_spatial_mismatch_is_refused():
    student, teacher = zoo.CNN([4, 8], 16, 10), zoo.CNN([16, 32], 64, 10)
    kd = FeatureKD(student, teacher, {"features.1": "features.1", "features.4": "features.4"},
                   feature_weight=1, logits_weight=0, label_weight=0, temperature=4)
    try:
        assert kd.probe(student, _batch((1, 8, 8))) == {"features.1": (4, 16), "features.4": (8, 32)}
        convs = list(kd.projections.values())
        assert all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in convs)
    finally:
        kd.close()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])

    # 8x8 (after the first conv) against 4x4 (after the first pool): no width change fixes that
    kd = FeatureKD(student, teacher, {"features.1": "features.2"}, feature_weight=1,
                   logits_weight=0, label_weight=0, temperature=4)
    try:
        with pytest.raises(ConfigError, match=r"spatial sizes differ \(\(8, 8\) vs \(4, 4\)\)"):
            kd.probe(student, _batch((1, 8, 8)))
    finally:
        kd.close()


def test_bad_student_layer_names_the_student_modules():
    with pytest.raises(ConfigError) as raised:
        FeatureKD(zoo.MLP(64, [16], 10), zoo.MLP(64, [32], 10), {"fc1": "layers.1"},
                  feature_weight=1, logits_weight=0, label_weight=1, temperature=4)
    assert "student layer 'fc1' is not a module of the student" in raised.value.message
    assert raised.value.hint == "student modules: layers, layers.0, layers.1, layers.2"


def test_the_feature_term_moves_the_student_toward_the_teacher_features():
    """Same student, same data: with feature_weight the hidden states end up closer."""
    from compressflow.training import TrainParams, fit

    bundle = load_digits_bundle(DataSpec(dataset="digits", train_fraction=0.3), 0, None)

    def context():
        return StageContext(
            name="t", seed=1, workdir=Path(tempfile.gettempdir()), metric="accuracy",
            data=lambda: bundle, evaluate=lambda m, loader=None: {"accuracy": accuracy(m, bundle.val)},
            model_at=lambda ref: None, build_model=lambda spec: None,
            log_metric=lambda *a: None, progress=lambda *a: None)

    torch.manual_seed(0)
    teacher = zoo.MLP(64, [32], 10)
    fit(teacher, bundle, TrainParams(epochs=5, lr=0.003), context())
    distances = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        student = zoo.MLP(64, [32], 10)
        kd = FeatureKD(student, teacher, {"layers.1": "layers.1"}, feature_weight=weight,
                       logits_weight=0, label_weight=1, temperature=4)
        inputs = bundle.example_input(64)
        kd.probe(student, inputs)
        fit(student, bundle, TrainParams(epochs=5, lr=0.003), context(), loss_fn=kd,
            extra_modules=[kd.projections])
        kd.close()
        with torch.no_grad():
            distances[weight] = float(nn.functional.mse_loss(student.layers[:2](inputs),
                                                             teacher.layers[:2](inputs)))
    assert distances[1.0] < 0.7 * distances[0.0]  # measured: about 0.5x


class _Block(nn.Module):
    """A transformer-like block: ``(hidden_states, attention)`` out, as older BertLayers give."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, states):
        return self.linear(states), None


class _Encoder(nn.Module):
    """Takes a tokenizer's dict; returns a mean-pooled embedding over the attended tokens."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(blocks))

    def forward(self, input_ids, attention_mask):
        states = self.embed(input_ids)
        for block in self.blocks:
            states = block(states)[0]
        weights = attention_mask.unsqueeze(-1).float()
        return (states * weights).sum(1) / weights.sum(1)


def test_embedding_task_matches_tuple_block_states_at_attended_tokens_and_the_teachers_cosine():
    from compressflow_tasks import Embedding

    torch.manual_seed(0)
    student, teacher = _Encoder(8, 1), _Encoder(8, 2)
    inputs = {"input_ids": torch.randint(0, 10, (3, 5)),
              "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])}
    kd = FeatureKD(student, teacher, {"blocks.0": "blocks.1"}, feature_weight=1,
                   logits_weight=0, label_weight=1, temperature=4, task=Embedding())
    try:
        assert kd.probe(student, inputs) == {}  # dict inputs, tuple outputs: same widths
        outputs = Embedding().predict(student, inputs)
        loss = kd(outputs, None, inputs)
        with torch.no_grad():
            s_states = student.blocks[0](student.embed(inputs["input_ids"]))[0]
            t_states = teacher.embed(inputs["input_ids"])
            t_states = teacher.blocks[1](teacher.blocks[0](t_states)[0])[0]
            expected_cosine = 1 - nn.functional.cosine_similarity(outputs, teacher(**inputs)).mean()
        attended = inputs["attention_mask"].bool()  # padding positions are not compared
        expected_mse = nn.functional.mse_loss(s_states[attended], t_states[attended])
        terms = kd.epoch_terms()
        assert set(terms) == {"feature_loss", "task_loss"}  # no cross-entropy: no labels
        assert terms["task_loss"] == pytest.approx(float(expected_cosine), rel=1e-5)
        assert terms["feature_loss"] == pytest.approx(float(expected_mse), rel=1e-5)
        expected = float(expected_mse + expected_cosine)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    finally:
        kd.close()


def test_the_logits_term_is_refused_for_an_embedding_task():
    from compressflow_tasks import Embedding

    with pytest.raises(ConfigError, match="logits_weight is for classification") as raised:
        FeatureKD(_Encoder(8, 1), _Encoder(8, 1), {"blocks.0": "blocks.0"}, feature_weight=1,
                  logits_weight=0.5, label_weight=1, temperature=4, task=Embedding())
    assert "logits_weight: 0" in raised.value.hint
