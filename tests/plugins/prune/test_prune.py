"""compressflow_prune: prune/magnitude zeroes exactly the requested share of the smallest |w|,
over the chosen layers together (global) or each layer on its own (layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import write_pipeline

MLP = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [48, 24], "num_classes": 10}}
CNN = {"source": "zoo:cnn", "args": {"channels": [4, 8], "hidden": 16, "num_classes": 10}}
QUIET = {"tracking": {"log_models": False}, "measure": {"latency": False}}
PRUNABLE = (nn.Linear, nn.Conv2d)


@pytest.fixture(scope="module")
def prune_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('prune-store') / 'mlflow.db'}"


def prune(folder: Path, uri: str, name: str, params: dict, model: dict = MLP):
    """Run input -> prune (randomly initialised weights: every |w| distinct, none zero)."""
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    path = write_pipeline(folder, [{"name": "pruned", "prune": params}], name=name, model=model, **QUIET)
    ctx = PipelineRunner(validate(path), tracking_uri=uri).run()
    return weights(ctx.results["input"].model), weights(ctx.results["pruned"].model), ctx


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def pruned_mask(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Where a nonzero weight became zero; every other weight must be untouched."""
    assert bool((before != 0).all())
    mask = after == 0
    assert torch.equal(after[~mask], before[~mask])
    return mask


def assert_smallest_pruned(before: torch.Tensor, mask: torch.Tensor) -> None:
    magnitudes = before.abs()
    assert magnitudes[mask].max() <= magnitudes[~mask].min()


def test_global_scope_hits_the_sparsity_exactly_over_all_layers(tmp_path, prune_store):
    before, after, ctx = prune(tmp_path, prune_store, "global", {"sparsity": 0.7, "scope": "global"})
    masks = {n: pruned_mask(before[n], after[n]) for n in before}
    total = sum(w.numel() for w in before.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.7 * total)
    # ranked across layers: the largest pruned |w| anywhere is below the smallest kept anywhere
    assert_smallest_pruned(torch.cat([before[n].flatten() for n in before]),
                           torch.cat([masks[n].flatten() for n in before]))
    # a global ranking does not prune each layer alike (their scales differ)
    shares = [float(m.float().mean()) for m in masks.values()]
    assert max(shares) - min(shares) > 0.05
    # biases are not pruned
    for name, module in ctx.results["pruned"].model.named_modules():
        if isinstance(module, PRUNABLE):
            assert torch.equal(module.bias, dict(ctx.results["input"].model.named_modules())[name].bias)


def test_layer_scope_gives_every_layer_the_sparsity(tmp_path, prune_store):
    before, after, ctx = prune(tmp_path, prune_store, "layer", {"sparsity": 0.5, "scope": "layer"}, model=CNN)
    assert set(before) == {"features.0", "features.3", "classifier.1", "classifier.3"}
    for name in before:
        mask = pruned_mask(before[name], after[name])
        assert int(mask.sum()) == round(0.5 * mask.numel()), name
        assert_smallest_pruned(before[name], mask)
    rows = Path(ctx.results["pruned"].artifacts["prune_layers"]).read_text().splitlines()
    for name in before:
        (row,) = [r for r in rows if r.startswith(f"| {name} |")]
        assert "0.5000" in row, row


def test_exclude_leaves_a_layer_dense(tmp_path, prune_store):
    before, after, _ = prune(tmp_path, prune_store, "exclude",
                             {"sparsity": 0.6, "exclude": ["layers.4"]})
    assert torch.equal(before["layers.4"], after["layers.4"])
    chosen = ["layers.0", "layers.2"]
    masks = [pruned_mask(before[n], after[n]) for n in chosen]
    assert sum(int(m.sum()) for m in masks) == round(0.6 * sum(before[n].numel() for n in chosen))
    assert_smallest_pruned(torch.cat([before[n].flatten() for n in chosen]),
                           torch.cat([m.flatten() for m in masks]))


def test_include_prunes_only_the_matching_layers(tmp_path, prune_store):
    before, after, _ = prune(tmp_path, prune_store, "include",
                             {"sparsity": 0.3, "scope": "layer", "include": ["layers.2"]})
    assert torch.equal(before["layers.0"], after["layers.0"])
    assert torch.equal(before["layers.4"], after["layers.4"])
    mask = pruned_mask(before["layers.2"], after["layers.2"])
    assert int(mask.sum()) == round(0.3 * mask.numel())


def test_a_pattern_that_matches_nothing_fails_with_a_clear_message(tmp_path, prune_store, cli):
    path = write_pipeline(tmp_path, [{"name": "pruned", "prune": {"sparsity": 0.5, "include": ["encoder.*"]}}],
                          **QUIET)
    result = cli("run", path, "--tracking-uri", prune_store, "--quiet")
    # found while running (the model's layers are known only then): a stage failure, exit 1
    assert result.exit_code == 1, result.output
    assert "stage 'pruned'" in result.stderr
    assert "encoder.*" in result.stderr
    assert "match no Linear or Conv layer" in result.stderr
    assert "layers.0" in result.stderr  # the hint lists the layers there are
    assert "Traceback" not in result.output


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_sparsity_out_of_range_is_refused_at_validate(tmp_path, cli, sparsity):
    path = write_pipeline(tmp_path, [{"prune": {"sparsity": sparsity}}])
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert "sparsity" in result.stderr
