"""compressflow-lowrank: the ``factorize/svd`` stage, a third-party compressflow plugin.

Every ``nn.Linear`` (``exclude`` patterns aside) becomes ``nn.Sequential(Linear(in, r,
bias=False), Linear(r, out))`` from a truncated SVD of its weight, where that makes the layer
smaller. This module stays light (pydantic and compressflow only): ``compressflow plugins``
and ``compressflow validate`` import it without importing torch; the SVD code lives in
:mod:`compressflow_lowrank.svd` and is imported by ``run``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from compressflow import Stage, StageParams, StageResult, hookimpl

__version__ = "0.1.0"

DEFAULT_ENERGY = 0.9


class FactorizeParams(StageParams):
    """How far to truncate: a fixed ``rank``, or the ``energy`` to keep (not both)."""

    rank: int | None = Field(None, ge=1, description="keep this many singular values per layer")
    energy: float | None = Field(
        None, gt=0, le=1,
        description=f"keep the smallest rank holding this share of sum(s^2) (default {DEFAULT_ENERGY})",
    )
    exclude: list[str] = Field(default_factory=list, description="layer-name patterns left whole (fnmatch)")

    @model_validator(mode="after")
    def _one_truncation(self) -> FactorizeParams:
        if self.rank is not None and self.energy is not None:
            raise ValueError("give rank or energy, not both")
        if self.rank is None and self.energy is None:
            self.energy = DEFAULT_ENERGY
        return self


class FactorizeSVD(Stage):
    """Replace Linear layers by two thinner ones from a truncated SVD (W ~ U_r S_r V_r^T)."""

    kind = "factorize"
    method = "svd"
    default = True
    Params = FactorizeParams

    def run(self, model, ctx):
        from compressflow_lowrank.svd import factorize_model, layer_table

        params = self.params
        model, reports = factorize_model(model, rank=params.rank, energy=params.energy,
                                         exclude=params.exclude)
        done = [r for r in reports if r.factorized]
        kept = [r for r in reports if not r.factorized]
        notes = []
        if kept:
            notes.append(
                f"{len(kept)} Linear layer(s) kept whole, a factorization would not be smaller: "
                + ", ".join(f"{r.name} ({r.out_features}x{r.in_features} at rank {r.rank})" for r in kept))
        before = sum(r.params_before for r in reports)
        after = sum(r.params_after for r in reports)
        metrics = {
            "factorized_layers": len(done),
            "kept_layers": len(kept),
            "linear_params_before": before,
            "linear_params_after": after,
        }
        if done:
            metrics["min_kept_energy"] = min(r.kept_energy for r in done)
        table = layer_table(reports, ctx.workdir / "factorize_layers.md")
        return StageResult(model, metrics=metrics, notes=notes, artifacts={"factorize_layers": table})


@hookimpl
def register_stages(registry) -> None:
    """factorize/svd."""
    registry.add(FactorizeSVD)
