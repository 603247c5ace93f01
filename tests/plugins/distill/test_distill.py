"""compressflow_distill: distill/logits. On a hard task with little data, a small student
taught by a big teacher beats the same student trained alone for as long on the same data.

The task: 10 classes of 2 Gaussian clusters each in 10 informative of 20 features
(make_classification, class_sep 1.5); teacher 20-256-256-10 trained on the whole training
split (2400 samples), student 20-32-10 on 10% of it (240 samples), both 40 epochs. Validation
accuracy over seeds 0-11 (teacher / alone / distilled), measured while writing this test:
the distilled student wins by 3.3 to 9.7 points (mean 7.4); seed 0, used here: 0.802 / 0.467 /
0.530.
"""

from __future__ import annotations

import pytest

from compressflow_tasks import accuracy
from tests.conftest import write_pipeline

SEED = 0
MARGIN = 0.025  # below the smallest gap seen over seeds 0-11 (0.033)
CLASSES = 10
SYNTHETIC = {"samples": 3000, "features": 20, "informative": 10, "classes": CLASSES,
             "clusters_per_class": 2, "class_sep": 1.5}
TEACHER = {"source": "zoo:mlp", "args": {"in_features": 20, "hidden": [256, 256], "num_classes": CLASSES}}
STUDENT = {"source": "zoo:mlp", "args": {"in_features": 20, "hidden": [32], "num_classes": CLASSES}}
LITTLE_DATA = {"train_fraction": 0.1}
STUDENT_TRAINING = {"epochs": 40, "lr": 0.01}
STAGES = [
    {"name": "teacher", "train": {"epochs": 20, "lr": 0.003}},
    {"name": "alone", "train": {**STUDENT_TRAINING, "model": STUDENT}, "data": LITTLE_DATA},
    {"name": "distilled", "distill": {"teacher": "teacher", "student": STUDENT, **STUDENT_TRAINING,
                                      "temperature": 4, "alpha": 0.9}, "data": LITTLE_DATA},
]


def pipeline_file(folder, stages=STAGES):
    return write_pipeline(folder, stages, name="distill", model=TEACHER,
                          data={"dataset": "synthetic", "batch_size": 64, "args": SYNTHETIC},
                          tracking={"log_models": False}, measure={"latency": False}, seed=SEED)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    folder = tmp_path_factory.mktemp("distill")
    runner = PipelineRunner(validate(pipeline_file(folder)), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                            keep_models=True)
    return runner, runner.run()


def test_distilled_student_beats_the_student_trained_alone(distilled):
    _, ctx = distilled
    teacher, alone, student = (ctx.results[n].metrics["accuracy"] for n in ("teacher", "alone", "distilled"))
    assert teacher > 0.7
    assert teacher > student  # the teacher knows more than either student
    assert student > alone + MARGIN, (teacher, alone, student)


def test_both_students_trained_on_the_small_split_and_have_the_student_architecture(distilled):
    runner, ctx = distilled
    small = runner.loader.data_for(next(p.data for p in runner.plan.stages if p.entry.name == "distilled"))
    full = runner.loader.data_for(runner.spec.data)
    assert len(small.train.dataset) == pytest.approx(0.1 * len(full.train.dataset), abs=1)
    for name in ("alone", "distilled"):
        model = ctx.results[name].model
        assert model.input_shape == (20,)
        assert [tuple(p.shape) for p in model.parameters()] == [(32, 20), (32,), (CLASSES, 32), (CLASSES,)]
        assert ctx.results[name].metrics["params_total"] == 32 * 20 + 32 + CLASSES * 32 + CLASSES
    # the validation split is the same for every stage, so the accuracies compare
    assert accuracy(ctx.results["distilled"].model, full.val) == pytest.approx(
        ctx.results["distilled"].metrics["accuracy"])


def test_teacher_is_left_as_it_was(distilled):
    runner, ctx = distilled
    teacher = ctx.results["teacher"]
    val = runner.loader.data_for(runner.spec.data).val
    assert accuracy(teacher.model.eval(), val) == pytest.approx(teacher.metrics["accuracy"])


def _refused(tmp_path, cli, teacher: str):
    stages = [dict(STAGES[0]), {"name": "distilled", "distill": {"teacher": teacher, "student": STUDENT}},
              {"name": "later", "finetune": {"epochs": 1}}]
    path = pipeline_file(tmp_path, stages)
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if f"teacher: {teacher}" in text)
    assert f"{path}:{line}" in result.stderr
    assert "stage 'distilled'" in result.stderr
    return result.stderr


def test_a_teacher_naming_no_stage_is_refused_at_validate(tmp_path, cli):
    error = _refused(tmp_path, cli, "teachr")
    assert "'teachr' names no earlier stage" in error
    assert "did you mean 'teacher'" in error


def test_a_teacher_that_runs_later_is_refused_at_validate(tmp_path, cli):
    error = _refused(tmp_path, cli, "later")
    assert "'later' names no earlier stage" in error
