"""structured_prune/heads: whole attention heads and FFN neurons removed from a tiny random
BERT (4 heads of 8, hidden 32, intermediate 64), the hidden size kept, the pruned model equal
to the original with those units silenced, a pipeline run, and what a saved folder reloads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from compressflow import ConfigError, StageFailed
from tests.conftest import write_pipeline
from tests.plugins.hf.conftest import EVAL_LINES, TRAIN_LINES
from tests.plugins.structured.conftest import FFN, HEAD_SIZE, HEADS, HIDDEN, batch, embed, load

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

from compressflow_hf.model import heads_removed  # noqa: E402
from compressflow_structured.transformer import check_forward, prune_heads_and_ffn  # noqa: E402

def prune(model, task, **settings):
    settings.setdefault("calibration", [batch(model, TRAIN_LINES)])
    return prune_heads_and_ffn(model, batch(model), task=task, **settings)


def scale_units(model, layer_index: int, head: int, neuron: int, factor: float) -> None:
    """Scale one head (its q/k/v rows and output columns) and one FFN neuron of a layer."""
    layer = model.model.encoder.layer[layer_index]
    rows = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
    with torch.no_grad():
        for linear in (layer.attention.self.query, layer.attention.self.key,
                       layer.attention.self.value):
            linear.weight[rows] *= factor
            linear.bias[rows] *= factor
        layer.attention.output.dense.weight[:, rows] *= factor
        layer.intermediate.dense.weight[neuron] *= factor
        layer.output.dense.weight[:, neuron] *= factor


def kept_neurons(original, pruned, index: int) -> list[int]:
    """The original indices of the FFN neurons layer ``index`` of ``pruned`` kept."""
    old = original.model.encoder.layer[index].intermediate.dense.weight
    new = pruned.model.encoder.layer[index].intermediate.dense.weight
    return [int((old == row).all(1).nonzero()[0]) for row in new]


def silenced(original, pruned, report):
    """The unpruned model with the removed heads' values and the removed neurons' output
    columns zeroed: what the pruned model must compute."""
    model = copy.deepcopy(original)
    for index, (widths, layer) in enumerate(zip(report.layers, model.model.encoder.layer)):
        gone = sorted(set(range(FFN)) - set(kept_neurons(original, pruned, index)))
        with torch.no_grad():
            for head in set(range(HEADS)) - set(widths.kept_heads):
                rows = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
                layer.attention.self.value.weight[rows] = 0
                layer.attention.self.value.bias[rows] = 0
            layer.output.dense.weight[:, gone] = 0
    return model


# --- what pruning removes and keeps ---------------------------------------------------------


def test_whole_heads_and_neurons_go_and_the_hidden_size_stays(encoder, task):
    original = copy.deepcopy(encoder)
    before = embed(encoder)
    report = prune(encoder, task, heads=0.5, ffn=0.5, importance="magnitude")

    for widths, layer in zip(report.layers, encoder.model.encoder.layer):
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            assert tuple(linear.weight.shape) == (2 * HEAD_SIZE, HIDDEN)
        assert tuple(layer.attention.output.dense.weight.shape) == (HIDDEN, 2 * HEAD_SIZE)
        assert tuple(layer.intermediate.dense.weight.shape) == (FFN // 2, HIDDEN)
        assert tuple(layer.output.dense.weight.shape) == (HIDDEN, FFN // 2)
        assert (attention.num_attention_heads, attention.all_head_size) == (2, 2 * HEAD_SIZE)
        assert attention.attention_head_size == HEAD_SIZE
        assert (widths.heads_before, widths.heads_after, widths.ffn_after) == (HEADS, 2, FFN // 2)
        assert len(set(widths.kept_heads)) == 2
    config = encoder.config
    assert (config.num_attention_heads, config.intermediate_size, config.head_dim) == (2, 32, 8)
    assert config.hidden_size == HIDDEN
    bert = encoder.model
    assert tuple(bert.embeddings.word_embeddings.weight.shape) == \
        tuple(original.model.embeddings.word_embeddings.weight.shape)
    assert tuple(bert.pooler.dense.weight.shape) == (HIDDEN, HIDDEN)
    with torch.no_grad():  # the pooler, unused by the embedding, still fits
        assert bert(**batch(encoder)).pooler_output.shape == (len(EVAL_LINES), HIDDEN)
    assert embed(encoder).shape == before.shape
    assert report.params_after < report.params_before
    assert heads_removed(encoder) and not heads_removed(original)


def test_the_pruned_model_computes_what_the_original_does_with_those_units_silenced(encoder, task):
    original = copy.deepcopy(encoder)
    report = prune(encoder, task, heads=0.5, ffn=0.5, importance="activation")
    assert len(kept_neurons(original, encoder, 1)) == FFN // 2
    assert torch.allclose(embed(encoder), embed(silenced(original, encoder, report)), atol=1e-5)
    assert not torch.allclose(embed(encoder), embed(original), atol=1e-3)  # something went


@pytest.mark.parametrize("importance", ["magnitude", "activation", "obs"])
def test_the_weakest_head_and_neuron_go_and_the_strongest_stay(encoder, task, importance):
    scale_units(encoder, 0, head=1, neuron=5, factor=1e-3)
    scale_units(encoder, 0, head=2, neuron=9, factor=10.0)
    original = copy.deepcopy(encoder)
    report = prune(encoder, task, heads=0.25, ffn=0.25, importance=importance)
    first = report.layers[0]
    assert 1 not in first.kept_heads and 2 in first.kept_heads and len(first.kept_heads) == 3
    neurons = kept_neurons(original, encoder, 0)
    assert 5 not in neurons and 9 in neurons and first.ffn_after == len(neurons) == 48


def test_ratio_zero_changes_nothing(encoder, task):
    before = embed(encoder)
    report = prune(encoder, task, heads=0.0, ffn=0.0, importance="magnitude")
    assert torch.allclose(embed(encoder), before, atol=1e-6)
    assert report.params_after == report.params_before
    assert encoder.config.num_attention_heads == HEADS and not heads_removed(encoder)


def test_a_plan_that_keeps_no_head_is_refused_before_any_change(encoder, task):
    before = embed(encoder)
    with pytest.raises(ConfigError, match="leaves none"):
        prune(encoder, task, heads=0.9, ffn=0.0)
    assert torch.equal(embed(encoder), before)


def test_taylor_refuses_a_model_that_still_equals_its_reference(encoder, task):
    with pytest.raises(StageFailed, match="no gradient"):
        prune(encoder, task, heads=0.5, ffn=0.0, importance="taylor",
              reference=copy.deepcopy(encoder))


def test_taylor_ranks_by_the_gradient_once_the_model_differs(encoder, task):
    reference = copy.deepcopy(encoder)
    scale_units(encoder, 0, head=0, neuron=0, factor=0.5)  # now the loss is not at its minimum
    report = prune(encoder, task, heads=0.5, ffn=0.5, importance="taylor", reference=reference,
                   calibration=[(batch(encoder, TRAIN_LINES), None)])
    assert report.layers[0].heads_after == 2 and report.calibration_samples == len(TRAIN_LINES)


def test_a_broken_layer_fails_naming_it(encoder, task):
    example = batch(encoder)
    shape = tuple(embed(encoder).shape)
    encoder.model.encoder.layer[1].attention.self.value = torch.nn.Linear(HIDDEN, 12)
    with pytest.raises(StageFailed, match=r"encoder\.layer\.1"):
        check_forward(encoder, example, task, shape)


# --- saving and reloading -------------------------------------------------------------------


def test_save_pretrained_writes_a_folder_that_reloads_identically_and_leaves_the_model(
        encoder, task, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    prune(encoder, task, heads=0.5, ffn=0.5)
    pruned = embed(encoder)
    weights = {k: v.clone() for k, v in encoder.state_dict().items()}
    folder = encoder.save_pretrained(tmp_path / "saved")

    # the model itself keeps its removed heads: only the folder has them back, as zero heads
    assert heads_removed(encoder) and encoder.config.num_attention_heads == 2
    assert encoder.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())
    bert = AutoModel.from_pretrained(folder, local_files_only=True)
    assert not heads_removed(bert)
    assert bert.config.num_attention_heads == HEADS and bert.config.intermediate_size == 32
    query = bert.encoder.layer[0].attention.self.query
    assert query.weight.shape == (HIDDEN, HIDDEN) and (query.weight[2 * HEAD_SIZE:] == 0).all()
    assert torch.allclose(embed(load(folder)), pruned, atol=1e-6)
    loaded = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    assert torch.allclose(torch.tensor(loaded.encode(EVAL_LINES)), pruned, atol=1e-5)


# --- a pipeline -----------------------------------------------------------------------------


def text_data(folder: Path) -> dict:
    (folder / "train.txt").write_text("\n".join(TRAIN_LINES) + "\n")
    (folder / "eval.txt").write_text("\n".join(EVAL_LINES) + "\n")
    return {"dataset": "text", "batch_size": 4,
            "args": {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "max_length": 32}}


def test_a_pipeline_prunes_heads_then_recovers_by_distillation(tmp_path, store, cli, folder):
    import mlflow
    import mlflow.pytorch

    stages = [{"structured_prune": {"method": "heads", "heads": 0.5, "ffn": 0.5, "refit": True}},
              {"finetune": {"epochs": 2, "lr": 1e-3, "teacher": "input"}}]
    path = write_pipeline(tmp_path, stages, name="heads", model={"source": f"hf:{folder}"},
                          data=text_data(tmp_path), task="embedding",
                          measure={"latency": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output

    mlflow.set_tracking_uri(store)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["heads"],
                                                            output_format="list")}
    pruned, tuned = runs["0-structured_prune"].data, runs["1-finetune"].data
    assert pruned.metrics["heads_per_layer"] == 2 and pruned.metrics["ffn_per_layer"] == 32
    assert pruned.metrics["params_total"] < runs["input"].data.metrics["params_total"]
    assert 0 < pruned.metrics["cosine_mean"] <= 1
    assert pruned.metrics["refit_error_after"] < pruned.metrics["refit_error_before"]
    # a random tiny BERT is near 1 already; that recovery trains the pruned shapes is the point
    assert tuned.metrics["cosine_mean"] > 0.9 and "final_train_loss" in tuned.metrics
    logged = mlflow.pytorch.load_model(runs["1-finetune"].data.tags["compressflow.model_uri"])
    assert logged.config.num_attention_heads == 2
    assert embed(logged).shape == (len(EVAL_LINES), HIDDEN)


def test_params_are_validated():
    from pydantic import ValidationError

    from compressflow_structured import HeadsParams

    assert HeadsParams(heads=0.5).ffn == 0.0
    for bad in ({"heads": 1.0}, {"ffn": -0.1}, {"heads": 0.5, "ratio": 0.5},
                {"importance": "hessian"}, {"heads": True}):
        with pytest.raises(ValidationError):
            HeadsParams(**bad)
