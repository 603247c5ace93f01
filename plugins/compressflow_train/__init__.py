"""Built-in ``train`` (from scratch) and ``finetune`` (continue) stages, on the shared loop."""

from __future__ import annotations

from pydantic import Field

from compressflow import ModelSpec, Stage, StageResult, hookimpl
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
    """Continue training the current model; zero weights stay exactly zero by default."""

    kind = "finetune"
    method = "supervised"
    default = True

    class Params(TrainParams):
        keep_zeros: bool = Field(True, description="pruned (zero) weights stay zero")

    def run(self, model, ctx):
        history = fit(model, ctx.data, self.params, ctx, freeze_zeros=self.params.keep_zeros)
        return StageResult(model, metrics=_last(history))


def _last(history: list[dict[str, float]]) -> dict[str, float]:
    return {f"final_{k}": v for k, v in history[-1].items()} if history else {}


@hookimpl
def register_stages(registry) -> None:
    """train and finetune."""
    registry.add(Train)
    registry.add(Finetune)
