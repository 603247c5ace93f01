"""compressflow_prune's patterns and scopes: N:M masks are exact for every criterion; layer,
global and per-layer targets are hit to the weight; bad combinations are refused up front."""

from __future__ import annotations

import copy

import pytest
import torch

from compressflow.engine import validate
from compressflow.errors import ConfigError
from compressflow_prune import (
    LeastSquaresPrune,
    MagnitudePrune,
    OBDPrune,
    PruneParams,
    TaylorPrune,
)
from tests.conftest import write_pipeline
from tests.plugins.prune.helpers import linear_weights, run_stage, sparsity, trained_mlp

STAGES = [MagnitudePrune, TaylorPrune, OBDPrune, LeastSquaresPrune]


@pytest.mark.parametrize("stage_class", STAGES, ids=lambda s: s.method)
@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_m_masks_are_exact(stage_class, pattern, n, m):
    model, bundle = trained_mlp()
    result, _ = run_stage(stage_class, model, bundle, pattern=pattern, calibration_batches=4)
    for name, weight in linear_weights(result.model).items():
        groups = (weight.flatten(1) != 0).reshape(len(weight), -1, m).sum(dim=2)
        # exactly N nonzeros in every M consecutive weights of every row
        assert bool((groups == n).all()), (name, groups.unique())
    assert result.metrics["target_sparsity"] == pytest.approx(1 - n / m)


def test_n_m_keeps_the_highest_scores_of_each_group():
    model, bundle = trained_mlp()
    before = linear_weights(model)
    result, _ = run_stage(MagnitudePrune, model, bundle, pattern="2:4")
    for name, weight in linear_weights(result.model).items():
        groups = before[name].abs().reshape(len(weight), -1, 4)
        kept = (weight != 0).reshape(groups.shape)
        # every kept |w| of a group is at least every pruned |w| of that group
        lowest_kept = torch.where(kept, groups, torch.inf).min(dim=2).values
        highest_pruned = torch.where(kept, -torch.inf, groups).max(dim=2).values
        assert bool((lowest_kept >= highest_pruned).all()), name
        assert torch.equal(weight[weight != 0], before[name][weight != 0])


def test_rows_that_do_not_split_into_groups_are_named():
    from compressflow_data.loaders import load_digits_bundle
    from compressflow import DataSpec
    from compressflow_models.zoo import MLP

    bundle = load_digits_bundle(DataSpec(dataset="digits"), 0, (64,))
    with pytest.raises(ConfigError) as error:
        run_stage(MagnitudePrune, MLP(64, [100], 10), bundle, pattern="4:8")
    assert "layers.2 (100)" in error.value.message and "layers.0" not in error.value.message
    assert "exclude" in error.value.hint
    result, _ = run_stage(MagnitudePrune, MLP(64, [100], 10), bundle, pattern="4:8",
                          exclude=["layers.2"])
    assert sparsity(result.model.layers[0].weight) == 0.5 and sparsity(result.model.layers[2].weight) == 0


@pytest.mark.parametrize("stage_class", STAGES, ids=lambda s: s.method)
def test_layer_scope_with_a_per_layer_override(stage_class):
    model, bundle = trained_mlp()
    result, ctx = run_stage(stage_class, model, bundle, sparsity=0.75, scope="layer",
                            per_layer={"layers.4": 0.3, "layers.*": 0.9}, exclude=["layers.2"],
                            calibration_batches=4)
    weights = linear_weights(result.model)
    assert sparsity(weights["layers.0"]) == pytest.approx(0.9, abs=1e-3)  # first match wins
    assert int((weights["layers.4"] == 0).sum()) == round(0.3 * 640)
    assert sparsity(weights["layers.2"]) == 0  # excluded
    assert result.metrics["target_sparsity"] == pytest.approx((0.9 * 8192 + 0.3 * 640) / (8192 + 640))
    table = (ctx.workdir / "prune_layers.md").read_text()
    assert "| layers.2 | (64, 128) | 0.0000 |" not in table  # excluded layers are not listed


@pytest.mark.parametrize("stage_class", STAGES, ids=lambda s: s.method)
def test_global_scope_hits_the_total_and_shares_it_unevenly(stage_class):
    model, bundle = trained_mlp()
    result, _ = run_stage(stage_class, model, bundle, sparsity=0.8, scope="global",
                          per_layer={"layers.4": 0.5}, calibration_batches=4)
    weights = linear_weights(result.model)
    pool = ["layers.0", "layers.2"]
    zeros = sum(int((weights[n] == 0).sum()) for n in pool)
    assert zeros == round(0.8 * sum(weights[n].numel() for n in pool))
    assert sparsity(weights["layers.0"]) != pytest.approx(sparsity(weights["layers.2"]), abs=0.02)
    assert sparsity(weights["layers.4"]) == 0.5


def test_least_squares_global_shares_sparsity_as_magnitude_does():
    model, bundle = trained_mlp()
    by_magnitude, _ = run_stage(MagnitudePrune, model, bundle, sparsity=0.7)
    by_least_squares, _ = run_stage(LeastSquaresPrune, trained_mlp()[0], bundle, sparsity=0.7,
                                    calibration_batches=4)
    magnitude, least_squares = linear_weights(by_magnitude.model), linear_weights(by_least_squares.model)
    for name in magnitude:
        assert sparsity(least_squares[name]) == sparsity(magnitude[name]), name
    # same counts, not the same weights: the kept ones were updated
    assert not torch.equal(least_squares["layers.2"] != 0, magnitude["layers.2"] != 0)


def test_exact_zeros_count_as_pruned_first():
    model, bundle = trained_mlp()
    with torch.no_grad():
        model.layers[2].weight[:, :32] = 0  # a quarter of the layer already zero
    before = model.layers[2].weight.detach() == 0
    for stage_class in STAGES:
        result, _ = run_stage(stage_class, copy.deepcopy(model), bundle,
                              sparsity=0.5, scope="layer", calibration_batches=4)
        after = result.model.layers[2].weight.detach() == 0
        assert bool(after[before].all()), stage_class.method  # still zero
        assert int(after.sum()) == round(0.5 * after.numel()), stage_class.method


@pytest.mark.parametrize("params, words", [
    ({"pattern": "4:2"}, ["pattern", "0 < N < M"]),
    ({"pattern": "0:4"}, ["pattern", "0 < N < M"]),
    ({"pattern": "block"}, ["pattern", "'unstructured' or N:M"]),
    ({"pattern": "2:4", "sparsity": 0.7}, ["implies sparsity 0.5"]),
    ({"pattern": "2:4", "per_layer": {"layers.0": 0.5}}, ["per_layer does not apply"]),
    ({"pattern": "2:4", "schedule": "gradual"}, ["reached in one shot"]),
    ({"scope": "layer"}, ["sparsity is required"]),
    ({"sparsity": 0.5, "steps": 3}, ["steps: only used with schedule: gradual"]),
    ({"sparsity": 0.5, "lr": 0.1}, ["lr: only used with schedule: gradual"]),
    ({"sparsity": 0.5, "schedule": "gradual", "initial_sparsity": 0.6}, ["must be below"]),
    ({"sparsity": 0.5, "per_layer": {"layers.0": 1.0}}, ["per_layer", "less than 1"]),
    ({"method": "obd", "sparsity": 0.5, "calibration_batches": 0}, ["calibration_batches"]),
])
def test_bad_params_are_refused_before_anything_runs(tmp_path, params, words):
    path = write_pipeline(tmp_path, [{"prune": params}])
    with pytest.raises(ConfigError) as error:
        validate(path)
    text = str(error.value)
    assert "stage '0-prune'" in text, text
    for word in words:
        assert word in text, text


def test_an_unquoted_yaml_pattern_reads_as_written(tmp_path):
    # YAML 1.1 reads 2:4 as the base-60 integer 124
    path = tmp_path / "nm.yaml"
    path.write_text(write_pipeline(tmp_path, [{"prune": {"method": "least-squares", "pattern": "PATTERN"}}])
                    .read_text().replace("PATTERN", "4:8"))
    (planned,) = validate(path).stages
    assert planned.stage.params.pattern == "4:8"
    assert planned.stage.params.n_m == (4, 8) and planned.stage.params.final_sparsity == 0.5
    assert PruneParams(pattern=124).pattern == "2:4"
    assert PruneParams(pattern="02:04").pattern == "2:4"


def test_a_per_layer_pattern_that_matches_no_layer_is_named():
    model, bundle = trained_mlp()
    with pytest.raises(ConfigError) as error:
        run_stage(MagnitudePrune, model, bundle, sparsity=0.5, per_layer={"encoder.*": 0.2})
    assert "'encoder.*'" in error.value.message and "layers.0" in error.value.hint
