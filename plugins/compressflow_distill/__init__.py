"""Built-in knowledge distillation: ``distill/logits`` (Hinton et al. 2015).

The student learns from the teacher's softened outputs, ``alpha * T^2 * KL(teacher || student)
+ (1 - alpha) * cross-entropy``, through the shared training loop.
"""

from __future__ import annotations

from pydantic import Field

from compressflow import ModelSpec, Stage, StageRef, StageResult, hookimpl
from compressflow.training import TrainParams, fit


class LogitsParams(TrainParams):
    """Who teaches whom, and how soft the targets are."""

    teacher: StageRef = Field("previous", description="input, previous, or a stage's name")
    student: ModelSpec | None = Field(None, description="a new model; default: the current model")
    temperature: float = Field(4.0, gt=0, description="softens both distributions")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term")


class LogitsDistill(Stage):
    """Train a student on the teacher's softened logits plus the labels."""

    kind = "distill"
    method = "logits"
    default = True
    Params = LogitsParams

    def run(self, model, ctx):
        from compressflow_distill.losses import logits_kd_loss

        teacher = ctx.model_at(self.params.teacher).eval()
        student = ctx.build_model(self.params.student) if self.params.student else model
        loss_fn = logits_kd_loss(teacher, self.params.temperature, self.params.alpha)
        history = fit(student, ctx.data, self.params, ctx, loss_fn=loss_fn)
        return StageResult(student, metrics={f"final_{k}": v for k, v in history[-1].items()}
                           if history else {})


@hookimpl
def register_stages(registry) -> None:
    """distill/logits."""
    registry.add(LogitsDistill)
