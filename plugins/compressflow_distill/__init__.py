"""Built-in knowledge distillation, through the shared training loop.

- ``distill/logits`` (Hinton et al. 2015): the student learns from the teacher's softened
  outputs, ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy``.
- ``distill/features`` (FitNets, Romero et al. 2015): hidden states too. ``layers`` maps
  student module names to teacher module names; where widths differ a projection (Linear, or
  1x1 conv for N,C,H,W features) learns alongside and is dropped from the returned model.
  For task ``embedding`` (a Hugging Face encoder after ``structured/drop-layers``, say) the
  features are the blocks' hidden states, matched at the attended tokens, and the task term
  is ``1 - cosine`` to the teacher's embedding.

``finetune`` (compressflow_train) reuses :func:`compressflow_distill.losses.logits_kd_loss`
when given a ``teacher``: distillation as recovery after pruning.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from compressflow import ModelSpec, Stage, StageRef, StageResult, hookimpl
from compressflow.training import TrainParams, fit


class LogitsParams(TrainParams):
    """Who teaches whom, and how soft the targets are."""

    teacher: StageRef = Field("previous", description="input, previous, or a stage's name")
    student: ModelSpec | None = Field(None, description="a new model; default: the current model")
    # below 0.05 the softened logits overflow to NaN; above 100 T^2 * KL loses precision
    temperature: float = Field(4.0, ge=0.05, le=100, description="softens both distributions")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term")


class LogitsDistill(Stage):
    """Train a student on the teacher's softened logits plus the labels (classification);
    on the teacher's embeddings, by the task's own loss (embedding)."""

    kind = "distill"
    method = "logits"
    default = True
    Params = LogitsParams
    tasks = ("classification", "embedding")

    def run(self, model, ctx):
        from compressflow_distill.losses import logits_kd_loss

        teacher = ctx.model_at(self.params.teacher).eval()
        student = ctx.build_model(self.params.student) if self.params.student else model
        loss_fn = logits_kd_loss(teacher, self.params.temperature, self.params.alpha, ctx.task)
        history = fit(student, ctx.data, self.params, ctx, loss_fn=loss_fn)
        return StageResult(student, metrics={f"final_{k}": v for k, v in history[-1].items()}
                           if history else {})


class FeaturesParams(TrainParams):
    """Who teaches whom, which layers learn from which, and the weight of each loss term."""

    teacher: StageRef = Field("previous", description="input, previous, or a stage's name")
    student: ModelSpec | None = Field(None, description="a new model; default: the current model")
    layers: dict[str, str] = Field(
        min_length=1, description="student module name -> teacher module name "
        "(as model.named_modules() names them, e.g. layers.1: layers.3)")
    feature_weight: float = Field(1.0, ge=0, description="weight of the mean feature MSE")
    logits_weight: float = Field(0.0, ge=0, description="weight of T^2 * KL on softened logits")
    label_weight: float = Field(
        1.0, ge=0, description="weight of the task's loss: cross-entropy on the labels "
        "(classification), 1 - cosine to the teacher's embedding (embedding)")
    temperature: float = Field(4.0, ge=0.05, le=100,
                               description="softens both distributions (logits term)")

    @model_validator(mode="after")
    def _some_weight(self):
        if not (self.feature_weight or self.logits_weight or self.label_weight):
            raise ValueError("feature_weight, logits_weight and label_weight are all 0: nothing to learn")
        return self


class _TermLogger:
    """The stage's context, plus each loss term's epoch mean logged (``train_feature_loss``...)."""

    def __init__(self, ctx, kd) -> None:
        self._ctx, self._kd, self.history = ctx, kd, []

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        terms = {f"train_{k}": v for k, v in self._kd.epoch_terms().items()}
        for name, value in terms.items():
            self._ctx.log_metric(name, value, step)
        self.history.append(terms)
        self._ctx.progress(step, total, {**metrics, **terms})


class FeaturesDistill(Stage):
    """Train a student on the teacher's hidden states (and optionally logits) plus the labels
    (classification) or the teacher's embeddings (embedding)."""

    kind = "distill"
    method = "features"
    Params = FeaturesParams
    tasks = ("classification", "embedding")

    def run(self, model, ctx):
        from compressflow_distill.features import FeatureKD

        params = self.params
        teacher = ctx.model_at(params.teacher).eval()
        student = ctx.build_model(params.student) if params.student else model
        data = ctx.data
        kd = FeatureKD(student, teacher, params.layers, feature_weight=params.feature_weight,
                       logits_weight=params.logits_weight, label_weight=params.label_weight,
                       temperature=params.temperature, task=ctx.task)
        try:
            widths = kd.probe(student, data.example_input(2, ctx.task))
            logger = _TermLogger(ctx, kd)
            history = fit(student, data, params, logger, loss_fn=kd,
                          extra_modules=[kd.projections])
        finally:
            kd.close()
        metrics = {f"final_{k}": v for k, v in history[-1].items()} if history else {}
        if logger.history:
            metrics.update({f"final_{k}": v for k, v in logger.history[-1].items()})
        metrics["projection_params"] = sum(p.numel() for p in kd.projections.parameters())
        notes = [f"trained {len(widths)} projection(s) alongside, not part of the model: "
                 + ", ".join(f"{name} {a}->{b}" for name, (a, b) in widths.items())] if widths else []
        return StageResult(student, metrics=metrics, notes=notes)


@hookimpl
def register_stages(registry) -> None:
    """distill/logits and distill/features."""
    registry.add(LogitsDistill)
    registry.add(FeaturesDistill)
