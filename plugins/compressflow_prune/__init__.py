"""Built-in unstructured pruning: zero the Linear/Conv weights that contribute least.

Four methods share one set of params (:class:`PruneParams`) and differ only in how they rank
weights (their *importance*); least-squares also updates the weights it keeps:

- ``magnitude`` (default): |w| (Han et al. 2015). No data.
- ``taylor``: first-order estimate of the loss increase, |w * dL/dw| of each calibration
  batch's mean cross-entropy, averaged over the batches (Molchanov et al. 2017/2019).
- ``obd``: second-order, 1/2 * w^2 * H_ii (Optimal Brain Damage, LeCun et al. 1990), the
  Hessian's diagonal estimated by the empirical Fisher: the mean squared per-sample gradient.
- ``least-squares``: OBS as SparseGPT does it (Frantar & Alistarh 2023), layer by layer in
  the order the forward pass runs them: H = X X^T from the layer's calibration inputs (taken
  through the already-pruned earlier layers), weights of lowest w^2 / [H^-1]_pp are pruned
  and the rest of each row updated to keep W X, in column blocks of 128 with a damped
  (1% of mean diag) Cholesky inverse. Logs each layer's relative reconstruction error
  ||W X - W' X||^2 / ||W X||^2 next to what magnitude pruning does to the same layer.

- ``wanda``: |w| * ||x|| (Sun et al. 2024), the weight times the norm of its input over the
  calibration data, compared within each output row, no update; on the same block-by-block
  (or layer-by-layer) calibration inputs as least-squares, and ``scope: global`` shares the
  sparsity among layers the same way.

Transformers (layers inside one ``nn.ModuleList`` of blocks, e.g. decoder layers) are
calibrated block by block on each block's true inputs, as SparseGPT and llm-compressor do
(:mod:`compressflow.calibration`): about two forward passes in all.

Patterns: ``unstructured``, or ``N:M`` (``pattern: 2:4``): exactly N nonzeros in every M
consecutive weights of a row (a row: one output's weights, ``weight.flatten(1)``; the sparsity
is then 1 - N/M and ``scope`` does not apply). ``scope: layer`` prunes ``sparsity`` of each
chosen layer; ``global`` ranks the chosen layers' weights together. Magnitude, taylor and obd
scores are compared across layers as they are (|w| as torch's global_unstructured does; taylor
and obd both estimate the loss increase, in the same units in every layer). Least-squares
scores are single-weight estimates in each layer's output units and, ranked across layers, they
misallocate badly (measured on the digits MLP at 70% global: even divided by each layer's
output energy ||W X||^2, they prune 99.9% of the 300->100 layer and the accuracy falls to 21%;
OBS's update makes a redundant layer look free, one weight at a time). So with ``scope:
global`` least-squares takes each layer's share from the global magnitude ranking (as many
weights as ``prune/magnitude`` would prune there), then prunes and reconstructs each layer.
``per_layer`` gives matching layers their own sparsity (they leave the global pool).

Schedule: ``oneshot``, or ``gradual``: ``steps`` pruning steps t = 1..n, step t prunes to
s_t = s_f + (s_i - s_f)(1 - t/n)^3 (Zhu & Gupta 2017; s_f = ``sparsity``, s_i =
``initial_sparsity``), each followed by ``finetune_epochs`` of the shared training loop with
the zeros frozen. Weights pruned once stay pruned; exact zeros count as pruned first.

Calibration (taylor, obd, least-squares): ``calibration_batches`` batches; the data's
calibration loader when it holds that many, else that many batches of the training split,
shuffled with the stage's seed (the calibration loader is itself a random subset of it).

    - prune: {method: least-squares, sparsity: 0.7, scope: layer}
    - prune: {method: taylor, pattern: "2:4"}
    - prune: {method: obd, sparsity: 0.9, schedule: gradual, steps: 5, finetune_epochs: 2}

Unquoted, ``pattern: 2:4`` is read by YAML 1.1 as the base-60 number 124; it is read back as
2:4. Every run writes ``prune_layers.md``: layer, shape, reached sparsity (least-squares adds
its relative reconstruction error, magnitude's on the same inputs and at the same sparsity,
and their ratio; wanda too, unless ``errors: false``, which collects only ||x||). Stage
metrics: ``target_sparsity``, ``calibration_samples``, and for least-squares (and wanda)
``reconstruction_error`` / ``reconstruction_error_magnitude`` (layer means).

What to expect (benchmarks/prune_criteria.py, one shot, no finetune): least-squares keeps
far more accuracy than magnitude; taylor and obd keep less, on a model that fits its training
data (the digits MLP: 100% train accuracy) the per-sample gradients that feed them are ~0
except on a few samples, so they rank weights by what those few samples need.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator

from compressflow import Stage, StageParams, hookimpl
from compressflow.training import TrainParams

Sparsity = Annotated[float, Field(ge=0, lt=1)]
_NM = re.compile(r"^(\d+):(\d+)$")

# The training loop's params for the gradual schedule, copied from TrainParams (so they never
# drift) except `epochs` (here: finetune_epochs per step) and `schedule` (here: oneshot or
# gradual; the loop's learning-rate schedule is `lr_schedule`).
_LOOP_FIELDS: dict[str, Any] = {
    name: (info.annotation, info) for name, info in TrainParams.model_fields.items()
    if name not in ("epochs", "schedule")
}
_LOOP_FIELDS["lr_schedule"] = (TrainParams.model_fields["schedule"].annotation,
                               TrainParams.model_fields["schedule"])


class _PruneFields(StageParams):
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="share of the chosen weights set to zero (final, for "
        "gradual); implied by an N:M pattern")
    pattern: str = Field("unstructured", description="unstructured, or N:M: exactly N "
                         "nonzeros in every M consecutive weights of a row (2:4, 4:8)")
    scope: Literal["layer", "global"] = Field(
        "global", description="rank weights per layer or across all chosen layers")
    include: list[str] = Field(default_factory=lambda: ["*"], description="layer-name patterns (fnmatch)")
    exclude: list[str] = Field(default_factory=list, description="layer-name patterns left dense")
    per_layer: dict[str, Sparsity] = Field(
        default_factory=dict, description="layer-name pattern (fnmatch) -> that layer's own "
        "sparsity, overriding `sparsity` (first matching pattern wins)")
    schedule: Literal["oneshot", "gradual"] = Field(
        "oneshot", description="prune at once, or in `steps` steps on the cubic schedule")
    steps: int = Field(10, ge=1, le=10_000, description="gradual: pruning steps")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="gradual: s_i, the curve at t=0")
    finetune_epochs: int = Field(1, ge=0, description="gradual: training epochs after each step")
    calibration_batches: int = Field(
        16, ge=1, description="taylor/obd/least-squares: batches to score (least-squares: "
        "to reconstruct) on; the data's calibration loader when it holds that many, else "
        "batches of the training split")


_LoopFields = create_model("_LoopFields", __base__=_PruneFields, **_LOOP_FIELDS)


class PruneParams(_LoopFields):
    """Which weights to prune, how many, in what pattern, and when."""

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, value: Any) -> Any:
        # YAML 1.1 (yaml.safe_load) reads an unquoted 2:4 as the base-60 number 124
        if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
            return f"{value // 60}:{value % 60}"
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value == "unstructured":
            return value
        match = _NM.match(value)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"must be 'unstructured' or N:M with 0 < N < M (2:4, 4:8), got {value!r}")
        return f"{int(match[1])}:{int(match[2])}"

    @model_validator(mode="after")
    def _consistent(self) -> PruneParams:
        nm = self.n_m
        if nm is None and self.sparsity is None:
            raise ValueError("sparsity is required (unless pattern is N:M, which implies it)")
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {self.pattern} implies sparsity {implied:g}; "
                                 f"omit sparsity (got {self.sparsity:g})")
            if self.per_layer:
                raise ValueError("per_layer does not apply to an N:M pattern; use exclude "
                                 "to leave layers dense")
            if self.schedule == "gradual":
                raise ValueError("an N:M pattern is reached in one shot; use schedule: oneshot "
                                 "and a finetune stage after it")
        if self.schedule == "oneshot":
            stray = {"steps", "initial_sparsity", "finetune_epochs", *_LOOP_FIELDS} & self.model_fields_set
            if stray:
                raise ValueError(f"{', '.join(sorted(stray))}: only used with schedule: gradual; "
                                 "a one-shot prune is followed by a finetune stage")
        elif self.initial_sparsity >= self.final_sparsity and self.initial_sparsity > 0:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity:g}) must be below "
                             f"sparsity ({self.final_sparsity:g})")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, or None when unstructured."""
        match = _NM.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def final_sparsity(self) -> float:
        """``sparsity``, or 1 - N/M for an N:M pattern."""
        nm = self.n_m
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)

    def train_params(self) -> TrainParams:
        """The training loop's settings for the epochs between gradual steps."""
        loop = {name: getattr(self, name) for name in _LOOP_FIELDS if name != "lr_schedule"}
        return TrainParams(epochs=self.finetune_epochs, schedule=self.lr_schedule, **loop)


MagnitudeParams = PruneParams  # the name of the params before the other criteria existed


class PruneStage(Stage):
    """Base of the pruning stages: a subclass supplies ``importance`` (and may override
    ``prune_layers``, as least-squares does). ``needs_data``: it scores on calibration data."""

    kind = "prune"
    Params = PruneParams
    needs_data: ClassVar[bool] = True

    def run(self, model, ctx):
        from compressflow_prune.schedule import run_prune

        self.task = ctx.task  # the criteria's loss and every forward pass go through it
        return run_prune(self, model, ctx)

    def importance(self, model, layers, batches):
        """``{layer name: score tensor shaped like its weight}``; the lowest are pruned.

        Scores of different layers must be comparable (``scope: global`` ranks them together).
        """
        raise NotImplementedError

    def prune_layers(self, model, layers, plan, batches):
        """Prune ``layers`` of ``model`` in place as ``plan`` (a :class:`~compressflow_prune.
        masks.Plan`) says. Returns per-layer figures for the table and the stage's metrics:
        ``{}``, or (least-squares) ``{layer: {"reconstruction_error": e, "magnitude_error": m}}``."""
        from compressflow_prune.masks import apply_masks, select_masks

        masks = select_masks(self.importance(model, layers, batches), plan, layers)
        apply_masks(layers, masks)
        return {}


class MagnitudePrune(PruneStage):
    """Zero the weights of smallest magnitude (Han et al. 2015)."""

    method = "magnitude"
    default = True
    needs_data = False

    def importance(self, model, layers, batches):
        from compressflow_prune.criteria import magnitude_scores

        return magnitude_scores(layers)


class TaylorPrune(PruneStage):
    """Zero the weights of smallest |w * dL/dw| (first-order loss change)."""

    method = "taylor"

    def importance(self, model, layers, batches):
        from compressflow_prune.criteria import taylor_scores

        return taylor_scores(model, layers, batches, self.task)


class OBDPrune(PruneStage):
    """Zero the weights of smallest 1/2 w^2 H_ii, H_ii the empirical Fisher (OBD)."""

    method = "obd"

    def importance(self, model, layers, batches):
        from compressflow_prune.criteria import obd_scores

        return obd_scores(model, layers, batches, self.task)


class LeastSquaresPrune(PruneStage):
    """OBS / SparseGPT: prune on w^2/[H^-1]_pp and update the rest to keep each layer's output."""

    method = "least-squares"

    def importance(self, model, layers, batches):
        """|w|, used only to share a global sparsity among layers (see the module's doc)."""
        from compressflow_prune.criteria import magnitude_scores

        return magnitude_scores(layers)

    def prune_layers(self, model, layers, plan, batches):
        from compressflow_prune.obs import least_squares_prune

        return least_squares_prune(model, layers, plan, batches,
                                   global_scores=self.importance if plan.pool else None,
                                   feed=self.task.feed)


class WandaParams(PruneParams):
    """prune's params, and whether to measure each layer's reconstruction error."""

    errors: bool = Field(
        True, description="measure each layer's reconstruction error (and magnitude's) for "
        "prune_layers.md; false: collect only ||x|| per input, which is all Wanda needs and "
        "costs samples x columns instead of samples x columns^2 (what llm-compressor does)")


class WandaPrune(LeastSquaresPrune):
    """Wanda: prune on |w| * ||x|| within each output row, no weight update."""

    method = "wanda"
    Params = WandaParams

    def prune_layers(self, model, layers, plan, batches):
        from compressflow_prune.obs import least_squares_prune, wanda

        return least_squares_prune(model, layers, plan, batches,
                                   global_scores=self.importance if plan.pool else None,
                                   feed=self.task.feed, solve=wanda, errors=self.params.errors)


@hookimpl
def register_stages(registry) -> None:
    """prune/magnitude (default), prune/taylor, prune/obd, prune/least-squares, prune/wanda."""
    for stage in (MagnitudePrune, TaylorPrune, OBDPrune, LeastSquaresPrune, WandaPrune):
        registry.add(stage)
