"""structured_prune/heads' least-squares refit (compressflow_structured.refit) on a tiny
random BERT: with nothing removed it solves back the original projections; after removal it
lowers every sub-layer's error and brings the embedding closer to the unpruned model's."""

from __future__ import annotations

import copy
import random

import pytest

from tests.plugins.hf.conftest import EVAL_LINES, WORDS
from tests.plugins.structured.conftest import batch, embed

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from compressflow_structured.refit import refit_outputs  # noqa: E402
from compressflow_structured.transformer import prune_heads_and_ffn  # noqa: E402


def sentences(count: int, seed: int = 0) -> list[str]:
    """Random sentences of 3 to 10 of the tiny vocabulary's words: enough distinct tokens
    for every projection's least-squares problem to be well posed."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 10))) for _ in range(count)]


def calibration(model) -> list[dict]:
    lines = sentences(96)
    return [batch(model, lines[i:i + 32]) for i in range(0, len(lines), 32)]


def cosine(model, original) -> float:
    return float(torch.nn.functional.cosine_similarity(embed(model), embed(original)).mean())


def test_with_nothing_removed_the_refit_solves_back_the_original_projections(encoder, task):
    original = copy.deepcopy(encoder)
    layer = encoder.model.encoder.layer[1]
    with torch.no_grad():  # start the refit far from the answer
        layer.output.dense.weight.zero_()
        layer.attention.output.dense.bias.fill_(3.0)

    errors = refit_outputs(encoder, original, calibration(encoder), task, ridge=0.0)

    for ours, theirs in zip(encoder.model.encoder.layer, original.model.encoder.layer):
        for name in ("attention.output.dense", "output.dense"):
            mine, truth = ours.get_submodule(name), theirs.get_submodule(name)
            assert torch.allclose(mine.weight, truth.weight, atol=1e-4), name
            assert torch.allclose(mine.bias, truth.bias, atol=1e-4), name
    assert [(e.layer, e.part) for e in errors] == [
        (f"model.encoder.layer.{i}", part) for i in (0, 1) for part in ("attention", "ffn")]
    assert all(e.after < 1e-8 for e in errors)
    assert errors[3].before > 0.1  # the zeroed FFN projection was far off
    assert torch.allclose(embed(encoder), embed(original), atol=1e-5)


def test_after_removal_every_error_drops_and_the_embedding_comes_closer(encoder, task):
    original = copy.deepcopy(encoder)
    plain = copy.deepcopy(encoder)
    settings = dict(heads=0.5, ffn=0.5, importance="activation", calibration=calibration(encoder),
                    task=task)
    prune_heads_and_ffn(plain, batch(plain), **settings)
    report = prune_heads_and_ffn(encoder, batch(encoder), refit=True, **settings)

    assert len(report.refit) == 4 and report.calibration_samples == 96
    assert all(e.after < e.before for e in report.refit)
    assert cosine(encoder, original) > cosine(plain, original)
    # the refit changes values, never shapes: the same units are kept
    for ours, theirs in zip(encoder.model.encoder.layer, plain.model.encoder.layer):
        assert torch.equal(ours.intermediate.dense.weight, theirs.intermediate.dense.weight)
        assert ours.output.dense.weight.shape == theirs.output.dense.weight.shape
    assert embed(encoder).shape == (len(EVAL_LINES), encoder.config.hidden_size)


def test_the_refit_needs_calibration_batches(encoder, task):
    with pytest.raises(ValueError, match="calibration"):
        prune_heads_and_ffn(encoder, batch(encoder), heads=0.5, ffn=0.0, importance="magnitude",
                            refit=True, task=task)


def test_sources_must_go_forward_through_the_original(encoder, task):
    # the original is walked once, layer by layer: a layer fitted to an earlier one than
    # its predecessor was cannot be served
    original = copy.deepcopy(encoder)
    with pytest.raises(ValueError, match="must go forward"):
        refit_outputs(encoder, original, calibration(encoder), task, sources=[(1, 1), (0, 0)])
