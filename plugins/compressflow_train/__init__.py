"""Built-in ``train`` (from scratch) and ``finetune`` (continue) stages, on the shared loop."""

from __future__ import annotations

from pydantic import Field

from compressflow import ModelSpec, OptionalStageRef, Stage, StageResult, hookimpl
from compressflow.training import TrainParams, fit


class Train(Stage):
    """Train from a fresh initialisation: the current model's architecture, or ``model``."""

    kind = "train"
    method = "supervised"
    default = True

    class Params(TrainParams):
        model: ModelSpec | None = Field(None, description="train this model instead of the current one")

    def run(self, model, ctx):
        import torch

        torch.manual_seed(ctx.seed)
        if self.params.model is not None:
            model = ctx.build_model(self.params.model)
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        history = fit(model, ctx.data, self.params, ctx)
        return StageResult(model, metrics=_last(history))


class Finetune(Stage):
    """Continue training the current model; zero weights stay exactly zero by default.

    With ``teacher`` (``input``, ``previous`` or a stage's name: typically the model before
    pruning) the loss is distillation's, ``alpha * T^2 * KL(teacher || model) + (1 - alpha) *
    cross-entropy`` (compressflow_distill's one implementation): recovery by distillation.
    """

    kind = "finetune"
    method = "supervised"
    default = True

    class Params(TrainParams):
        keep_zeros: bool = Field(True, description="pruned (zero) weights stay zero")
        teacher: OptionalStageRef = Field(
            None, description="distill from this model while finetuning: input, previous or a stage's name")
        # distill's bounds: below 0.05 the softened logits overflow to NaN
        temperature: float = Field(4.0, ge=0.05, le=100,
                                   description="with teacher: softens both distributions")
        alpha: float = Field(0.9, ge=0, le=1, description="with teacher: weight of the distillation term")

    def run(self, model, ctx):
        refuse_quantized(model)
        loss_fn = None
        if self.params.teacher:
            from compressflow_distill.losses import logits_kd_loss

            teacher = ctx.model_at(self.params.teacher)
            loss_fn = logits_kd_loss(teacher, self.params.temperature, self.params.alpha, ctx.task)
        history = fit(model, ctx.data, self.params, ctx, loss_fn=loss_fn,
                      freeze_zeros=self.params.keep_zeros)
        return StageResult(model, metrics=_last(history))


def quantized_layers(model) -> list[str]:
    """Names of the torch.ao quantized modules (int8 kernels: no float weights to train)."""
    prefixes = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    found: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in found)  # its packed params
        if not inside and type(module).__module__.startswith(prefixes):
            found.append(name)
    return [name or "(root)" for name in found]


def refuse_quantized(model) -> None:
    """A ValueError naming the quantized layers: gradient descent cannot train int8 kernels."""
    layers = quantized_layers(model)
    if layers:
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        raise ValueError(
            f"the model is quantized (torch.ao int8 modules: {shown}) and cannot be "
            "trained; finetune (or distill into) the float model before the quantize stage, "
            "then quantize again")


def _last(history: list[dict[str, float]]) -> dict[str, float]:
    return {f"final_{k}": v for k, v in history[-1].items()} if history else {}


@hookimpl
def register_stages(registry) -> None:
    """train and finetune."""
    registry.add(Train)
    registry.add(Finetune)
