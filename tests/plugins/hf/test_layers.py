"""structured/drop-layers on tiny random transformers, and distill/features recovering from it.

A 4-layer BERT keeps layers 0 and 2; the result saves, and loads again with hf: and
sentence-transformers to the same embeddings. Through a real pipeline, distill/features then
teaches the 2 kept layers the teacher's layers 1 and 3 (hidden states) and its embeddings
(1 - cosine), and the cosine to the input model rises above what dropping left.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from compressflow import ConfigError, DataBundle, StageContext, StageFailed
from compressflow.task import Task
from tests.conftest import write_pipeline
from tests.plugins.hf.conftest import EVAL_LINES, sentence_modules, tokenizer
from tests.plugins.hf.test_hf import embed, load, sentence_transformer, text_files

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from compressflow_hf.layers import (  # noqa: E402  (after the importorskip)
    DropLayers,
    DropLayersParams,
    chosen,
    drop_layers,
    find_layers,
    spread,
)

FOUR_TO_TWO = {"model.encoder.layer.0": "model.encoder.layer.1",
               "model.encoder.layer.1": "model.encoder.layer.3"}


@pytest.fixture(scope="module")
def bert4(tmp_path_factory) -> Path:
    """A random BERT of 4 layers (hidden 32) as a sentence-transformers folder."""
    pytest.importorskip("sentence_transformers")
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert4")
    tok = tokenizer(folder)
    torch.manual_seed(0)
    # at BERT's own 0.02 the random layers barely move the residual stream (cosine 0.9998 with
    # half of them dropped): 0.1 makes every layer matter, as trained ones do (about 0.84)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        initializer_range=0.1)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    sentence_modules(folder, {"pooling_mode_mean_tokens": True}, True)
    return folder


def detached(model, task=None) -> StageContext:
    """A stage context whose data is one tokenized batch of the evaluation lines."""
    from compressflow_tasks import Embedding

    batch = dict(model.tokenizer(EVAL_LINES, padding=True, return_tensors="pt"))
    data = DataBundle(train=[batch], val=[batch], calibration=[batch])
    return StageContext.detached(data, lambda m, loader=None: {}, task=task or Embedding())


def kept_layer_idx(model) -> list[int]:
    return [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


# --- the stage alone ----------------------------------------------------------------------


def test_alternate_layers_are_kept_and_the_model_saves_and_reloads_in_both_libraries(
        bert4, tmp_path):
    model, original = load(str(bert4), tmp_path), load(str(bert4), tmp_path)
    result = DropLayers("drop", DropLayersParams(layers=2)).run(model, detached(model))
    assert result.notes == ["4 -> 2 layers (kept 0, 2)"]
    assert result.metrics == {"layers_kept": 2, "layers_dropped": 2}
    assert len(model.model.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    assert kept_layer_idx(model) == [0, 1]
    for new, old in enumerate([0, 2]):  # the kept layers' weights, untouched
        kept, before = model.model.encoder.layer[new], original.model.encoder.layer[old]
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                     before.state_dict().values()))

    expected = embed(model, EVAL_LINES)
    assert not torch.allclose(expected, embed(original, EVAL_LINES), atol=1e-3)
    saved = model.save_pretrained(tmp_path / "saved")
    reloaded = load(str(saved), tmp_path)
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.model.encoder.layer) == 2
    assert torch.allclose(embed(reloaded, EVAL_LINES), expected, atol=1e-6)
    encoded = torch.tensor(sentence_transformer(saved).encode(EVAL_LINES))
    assert torch.allclose(encoded, expected, atol=1e-5)


def test_layers_spread_from_the_first_and_params_take_exactly_one_of_keep_and_layers():
    assert spread(6, 3) == [0, 2, 4] and spread(4, 2) == [0, 2]
    assert spread(12, 6) == [0, 2, 4, 6, 8, 10] and spread(6, 4) == [0, 1, 3, 4]
    assert spread(3, 3) == [0, 1, 2] and spread(5, 1) == [0]
    assert chosen(DropLayersParams(keep=[1, 3, 5]), 6) == [1, 3, 5]
    for bad, message in [({}, "exactly one of keep"), ({"keep": [0], "layers": 1}, "exactly one"),
                         ({"keep": [2, 0]}, "must be increasing"), ({"keep": [1, 1]}, "increasing"),
                         ({"keep": []}, "at least 1"), ({"layers": 0}, "greater than or equal"),
                         ({"keep": [-1]}, "greater than or equal"), ({"layers": True}, "not true")]:
        with pytest.raises(ValidationError, match=message):
            DropLayersParams.model_validate(bad)


def test_layers_the_model_lacks_and_models_that_are_no_transformers_are_refused(bert4, tmp_path):
    from compressflow_models import zoo

    with pytest.raises(ConfigError, match=r"keep names layer\(s\) \[4, 7\], but the model has 4 "
                                          r"layers \(0 to 3\)"):
        chosen(DropLayersParams(keep=[0, 4, 7]), 4)
    with pytest.raises(ConfigError, match="layers: 5, but the model has 4 layers"):
        chosen(DropLayersParams(layers=5), 4)
    with pytest.raises(ConfigError, match="the model is a MLP, not a Hugging Face") as caught:
        find_layers(zoo.MLP(8, [4], 2))
    assert "hf:<folder>" in caught.value.hint


def test_llama_like_layers_are_found_and_their_layer_types_and_cache_follow(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=4, max_window_layers=2)
    model = Qwen2ForCausalLM(config).eval()
    types = list(config.layer_types)  # full, full, sliding, sliding
    stack = drop_layers(model, [1, 3])
    assert stack.name == "model.layers" and model.config.num_hidden_layers == 2
    assert model.config.layer_types == [types[1], types[3]]
    assert kept_layer_idx(model) == [0, 1]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert len(out.past_key_values.layers) == 2 and out.logits.shape == (1, 6, 30)
    model.save_pretrained(tmp_path / "qwen")  # the config validates: its lists fit its count


def test_a_per_layer_config_list_left_uncut_fails_at_the_stage_not_at_save(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from compressflow_hf import layers

    config = Qwen2Config(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2)
    monkeypatch.setattr(layers, "PER_LAYER_CONFIG", ())  # as for a list it does not know of
    with pytest.raises(StageFailed, match="the Qwen2Config no longer validates: .*layer_types"):
        drop_layers(Qwen2ForCausalLM(config), [0, 2])


def test_an_hf_causal_lm_drops_layers_and_reloads_to_the_same_logits(hf_folders, tmp_path):
    from compressflow_tasks import CausalLM

    model = load(str(hf_folders / "llama"), tmp_path)
    result = DropLayers("drop", DropLayersParams(layers=1)).run(model, detached(model, CausalLM()))
    assert result.notes == ["2 -> 1 layers (kept 0)"] and len(model.model.model.layers) == 1
    inputs = dict(model.tokenizer(EVAL_LINES, padding=True, return_tensors="pt"))
    reloaded = load(str(model.save_pretrained(tmp_path / "saved")), tmp_path)
    with torch.inference_mode():
        assert torch.allclose(reloaded(**inputs), model(**inputs), atol=1e-6)
    assert reloaded.config.num_hidden_layers == 1


def test_gpt2_blocks_are_found_under_their_own_names():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(vocab_size=30, n_embd=32, n_layer=4, n_head=2, n_positions=16))
    assert drop_layers(model, [0, 3]).name == "h"
    assert model.config.n_layer == 2 and kept_layer_idx(model) == [0, 1]


def test_a_kept_layer_that_breaks_or_gives_nan_fails_the_stage_naming_it(bert4, tmp_path):
    model = load(str(bert4), tmp_path)
    attention = model.model.encoder.layer[2].attention

    def broken(*_args, **_kwargs):
        raise RuntimeError("shapes do not fit")

    attention.forward = broken
    with pytest.raises(StageFailed, match=r"fails in model.encoder.layer.1 \(layer 2 before\): "
                                          "RuntimeError: shapes do not fit"):
        DropLayers("drop", DropLayersParams(keep=[0, 2])).run(model, detached(model))

    model = load(str(bert4), tmp_path)
    with torch.no_grad():
        model.model.encoder.layer[3].output.dense.weight.fill_(float("nan"))
    with pytest.raises(StageFailed, match=r"model.encoder.layer.1 \(layer 3 before\) gives NaN"):
        DropLayers("drop", DropLayersParams(keep=[1, 3])).run(model, detached(model, Task()))


# --- drop, then distill, through a real pipeline ------------------------------------------


def test_drop_then_distill_features_raises_the_cosine_to_the_input(tmp_path, store, cli, bert4):
    import mlflow
    import mlflow.pytorch

    (tmp_path / "model").symlink_to(bert4)
    stages = [{"name": "dropped", "structured": {"method": "drop-layers", "keep": [0, 2]}},
              {"name": "distilled", "distill": {"method": "features", "teacher": "input",
                                                "layers": FOUR_TO_TWO, "epochs": 8, "lr": 0.003}}]
    path = write_pipeline(tmp_path, stages, name="hf-drop", model={"source": "hf:model"},
                          data=text_files(tmp_path), task="embedding", measure={"latency": False})
    assert cli("validate", path).exit_code == 0
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output

    mlflow.set_tracking_uri(store)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["hf-drop"],
                                                            output_format="list")}
    dropped, distilled = runs["dropped"].data.metrics, runs["distilled"].data.metrics
    assert dropped["cosine_mean"] < 0.95  # dropping lost something to recover
    assert distilled["cosine_mean"] > dropped["cosine_mean"] + 0.05  # measured: 0.84 -> 0.98
    before = runs["input"].data.metrics["params_total"]
    assert distilled["params_total"] == dropped["params_total"] < before
    assert {"final_train_feature_loss", "final_train_task_loss"} <= set(distilled)
    notes = mlflow.artifacts.download_artifacts(run_id=runs["dropped"].info.run_id,
                                                artifact_path="notes.txt",
                                                dst_path=tempfile.mkdtemp())
    assert "4 -> 2 layers (kept 0, 2)" in Path(notes).read_text()

    model = mlflow.pytorch.load_model(runs["distilled"].data.tags["compressflow.model_uri"])
    assert len(model.model.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    assert not any(m._forward_hooks for m in model.modules())  # the capture hooks are gone


def test_refit_makes_each_kept_layer_stand_in_for_its_span(bert4, tmp_path):
    from tests.plugins.structured.test_refit import sentences

    model, plain, original = (load(str(bert4), tmp_path) for _ in range(3))
    lines = sentences(96)
    batches = [dict(model.tokenizer(lines[i:i + 32], padding=True, return_tensors="pt"))
               for i in range(0, 96, 32)]
    ctx = StageContext.detached(DataBundle(train=batches, val=batches, calibration=batches),
                                lambda m, loader=None: {}, task=detached(model).task)
    DropLayers("drop", DropLayersParams(layers=2)).run(plain, ctx)
    result = DropLayers("drop", DropLayersParams(layers=2, refit=True)).run(model, ctx)

    assert result.metrics["refit_error_after"] < result.metrics["refit_error_before"]
    assert "refitted by least squares" in result.notes[-1]
    # kept layer 0 stands for layers 0-1: its FFN's LayerNorm is now layer 1's
    assert torch.equal(model.model.encoder.layer[0].output.LayerNorm.weight,
                       original.model.encoder.layer[1].output.LayerNorm.weight)
    target = embed(original, EVAL_LINES)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(embed(model, EVAL_LINES), target).mean() > cosine(embed(plain, EVAL_LINES), target).mean()


def test_refit_is_refused_on_layers_that_are_not_bert_ones():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4)}
    ctx = StageContext.detached(DataBundle(train=[batch], val=[batch], calibration=[batch]),
                                lambda m, loader=None: {}, task=Task())
    with pytest.raises(ConfigError, match="drop-layers: refit: .*no encoder.layer"):
        DropLayers("drop", DropLayersParams(layers=2, refit=True)).run(model, ctx)
    assert model.config.num_hidden_layers == 4  # refused before anything changed
