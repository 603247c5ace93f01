"""Built-in unstructured pruning: ``prune/magnitude`` zeroes the smallest |w| of Linear/Conv
weights, over all chosen layers at once (``scope: global``) or layer by layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compressflow import Stage, StageParams, StageResult, hookimpl


class MagnitudeParams(StageParams):
    """Which weights to prune, and how many."""

    sparsity: float = Field(ge=0, lt=1, description="share of the chosen weights set to zero")
    scope: Literal["layer", "global"] = Field("global", description="rank weights per layer or across all")
    include: list[str] = Field(default_factory=lambda: ["*"], description="layer-name patterns (fnmatch)")
    exclude: list[str] = Field(default_factory=list, description="layer-name patterns left dense")


class MagnitudePrune(Stage):
    """Zero the weights of smallest magnitude (Han et al. 2015)."""

    kind = "prune"
    method = "magnitude"
    default = True
    Params = MagnitudeParams

    def run(self, model, ctx):
        from compressflow_prune.masks import layer_table, magnitude_masks, prunable_layers

        layers = prunable_layers(model, self.params.include, self.params.exclude)
        masks = magnitude_masks(layers, self.params.sparsity, self.params.scope)
        for name, module in layers.items():
            module.weight.data.mul_(masks[name])
        table = layer_table(layers, ctx.workdir / "prune_layers.md")
        return StageResult(model, artifacts={"prune_layers": table})


@hookimpl
def register_stages(registry) -> None:
    """prune/magnitude."""
    registry.add(MagnitudePrune)
