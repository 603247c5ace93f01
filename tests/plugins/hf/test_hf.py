"""compressflow_hf: the hf: source on tiny random folders, through real pipelines and alone."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest

from compressflow import ConfigError, SourceContext
from tests.conftest import write_pipeline
from tests.plugins.hf.conftest import EVAL_LINES, TRAIN_LINES, sentence_modules

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

QUIET = {"tracking": {"log_models": False}, "measure": {"latency": False}}


def context(base: Path, place: str = "p.yaml:5") -> SourceContext:
    return SourceContext(base_dir=base, place=place)


def load(reference: str, base: Path, **args):
    from compressflow_hf import HFSource

    return HFSource().load(reference, args, context(base))


def sentence_transformer(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def embed(model, lines: list[str]):
    from compressflow.task import call

    inputs = dict(model.tokenizer(lines, padding=True, truncation=True, return_tensors="pt"))
    with torch.inference_mode():
        return call(model.eval(), inputs)


def text_files(folder: Path) -> dict:
    (folder / "train.txt").write_text("\n".join(TRAIN_LINES) + "\n")
    (folder / "eval.txt").write_text("\n".join(EVAL_LINES) + "\n")
    return {"dataset": "text", "batch_size": 4,
            "args": {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "max_length": 32}}


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# --- a real pipeline --------------------------------------------------------------------


def test_a_pipeline_validates_runs_and_logs_embeddings_sentence_transformers_gives(
        tmp_path, store, cli, hf_folders):
    import mlflow
    import mlflow.pytorch

    (tmp_path / "model").symlink_to(hf_folders / "bert")  # hf: resolves from the pipeline's folder
    path = write_pipeline(tmp_path, [{"quantize": {"method": "dynamic-int8"}}], name="hf-embed",
                          model={"source": "hf:model"}, data=text_files(tmp_path), task="embedding",
                          measure={"repeats": 3, "warmup": 1, "batch_sizes": [1]})
    checked = cli("validate", path)
    assert checked.exit_code == 0, checked.output
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output

    mlflow.set_tracking_uri(store)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["hf-embed"],
                                                            output_format="list")}
    logged = mlflow.pytorch.load_model(runs["input"].data.tags["compressflow.model_uri"])
    expected = torch.tensor(sentence_transformer(hf_folders / "bert").encode(EVAL_LINES))
    assert torch.allclose(embed(logged, EVAL_LINES), expected, atol=1e-5)
    quantized = runs["0-quantize"].data.metrics
    assert runs["input"].data.metrics["cosine_mean"] == pytest.approx(1.0)
    assert quantized["cosine_mean"] > 0.95 and quantized["size_bytes"] < runs["input"].data.metrics["size_bytes"]


def test_a_causal_lm_folder_gives_logits_and_runs_under_causal_lm(tmp_path, store, cli, hf_folders):
    from transformers import AutoModelForCausalLM

    model = load(str(hf_folders / "llama"), tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(hf_folders / "llama", local_files_only=True).eval()
    inputs = dict(model.tokenizer(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        logits = model(**inputs)
        assert torch.equal(logits, reference(**inputs).logits)
    assert logits.shape == (2, inputs["input_ids"].shape[1], len(model.tokenizer))

    data = text_files(tmp_path)
    data["args"].update(window=8, stride=4)
    path = write_pipeline(tmp_path, [{"quantize": {"method": "dynamic-int8"}}], name="hf-lm",
                          model={"source": f"hf:{hf_folders / 'llama'}"}, data=data,
                          task="causal-lm", **QUIET)
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output


# --- what the loaded model is -----------------------------------------------------------


@pytest.mark.parametrize("pooling, normalize", [
    ({"pooling_mode_mean_tokens": True}, True),
    ({"pooling_mode_cls_token": True}, False),
    ({"pooling_mode": ["max", "mean"]}, False),
    ({"pooling_mode": "lasttoken"}, True),
    ({"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_weightedmean_tokens": True}, False),
])
def test_pooling_and_normalize_follow_the_folder_as_sentence_transformers_does(bert, pooling, normalize):
    sentence_modules(bert, pooling, normalize)
    model = load(str(bert), bert)
    expected = torch.tensor(sentence_transformer(bert).encode(EVAL_LINES))
    assert torch.allclose(embed(model, EVAL_LINES), expected, atol=1e-5)
    assert model.normalize is normalize


def test_do_lower_case_lower_cases_as_sentence_transformers_does(bert, tmp_path):
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab=str(bert / "vocab.txt"), do_lower_case=False).save_pretrained(bert)
    settings = json.loads((bert / "sentence_bert_config.json").read_text())
    (bert / "sentence_bert_config.json").write_text(json.dumps({**settings, "do_lower_case": True}))
    shouted = ["The Cat SAT on the Mat", "A DOG ran"]
    model = load(str(bert), tmp_path)
    assert model.tokenizer("The Cat")["input_ids"] == model.tokenizer("the cat")["input_ids"]
    expected = torch.tensor(sentence_transformer(bert).encode(shouted))
    assert torch.allclose(embed(model, shouted), expected, atol=1e-5)


def test_padding_is_masked_never_a_fixed_width(hf_folders, tmp_path):
    model = load(str(hf_folders / "bert"), tmp_path)
    alone = torch.cat([embed(model, [line]) for line in EVAL_LINES])
    batched = embed(model, EVAL_LINES)
    assert embed(model, ["dog"]).shape == (1, 32)
    assert torch.allclose(alone, batched, atol=1e-5)  # the shortest line is padded to the longest


def test_args_override_the_folder(hf_folders, tmp_path):
    folder = str(hf_folders / "bert")
    cls = load(folder, tmp_path, pooling="cls", normalize=False)
    inputs = dict(cls.tokenizer(EVAL_LINES, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        states = cls.model(**inputs).last_hidden_state
        assert torch.equal(cls(**inputs), states[:, 0])
        tokens = load(folder, tmp_path, pooling="none")(**inputs)
    assert torch.equal(tokens, states)
    assert load(folder, tmp_path, max_length=5).tokenizer.model_max_length == 5
    assert load(folder, tmp_path).tokenizer.model_max_length == 48  # sentence_bert_config.json


def test_kind_encoder_pools_a_causal_lms_base_model(hf_folders, tmp_path):
    from compressflow_hf.model import HFEncoder

    model = load(str(hf_folders / "llama"), tmp_path, kind="encoder", pooling="lasttoken")
    assert isinstance(model, HFEncoder) and not hasattr(model.model, "lm_head")
    assert embed(model, EVAL_LINES).shape == (len(EVAL_LINES), 32)


def test_the_model_deep_copies_pickles_and_takes_the_task_contracts_dict(hf_folders, tmp_path):
    from compressflow.task import call
    from compressflow_tasks import Embedding

    model = load(str(hf_folders / "bert"), tmp_path)
    expected = embed(model, EVAL_LINES)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.tokenizer is not model.tokenizer
        assert torch.equal(embed(other, EVAL_LINES), expected)  # embed tokenizes with other's
    batch = dict(model.tokenizer(EVAL_LINES, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        assert torch.equal(Embedding().predict(model, batch), call(model, batch))
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("pooling", [{"pooling_mode_mean_tokens": True}, {"pooling_mode": ["mean", "cls"]}])
def test_save_pretrained_writes_a_folder_both_libraries_load_again(bert, tmp_path, pooling):
    sentence_modules(bert, pooling, True)
    model = load(str(bert), tmp_path)
    saved = model.save_pretrained(tmp_path / "saved")
    expected = embed(model, EVAL_LINES)
    assert torch.allclose(embed(load(str(saved), tmp_path), EVAL_LINES), expected, atol=1e-6)
    assert torch.allclose(torch.tensor(sentence_transformer(saved).encode(EVAL_LINES)), expected, atol=1e-5)


# --- what is refused --------------------------------------------------------------------


@pytest.mark.parametrize("source, args, message", [
    ("hf:missing", {}, "hf: folder '{tmp}/missing' does not exist"),
    ("hf:empty", {}, "holds no config.json, so it is no Hugging Face model folder"),
    ("hf:pkg:no_such_package_xyz", {}, "hf:pkg: no installed package 'no_such_package_xyz'"),
    ("hf:pkg:compressflow_hf/../..", {}, "leaves the package"),
    ("hf:pkg:compressflow_hf", {}, "compressflow_hf's folder holds no config.json"),
    ("hf:bert", {"pooling": "avg"}, "hf: arg pooling: Input should be"),
    ("hf:bert", {"max_length": True}, "hf: arg max_length"),
    ("hf:bert", {"trust_remote_code": True}, "hf: takes no arg trust_remote_code"),
    ("hf:llama", {"pooling": "mean"}, "is loaded as a causal LM"),
])
def test_bad_input_is_exit_2_at_its_line(tmp_path, cli, hf_folders, source, args, message):
    (tmp_path / "empty").mkdir()
    for name in ("bert", "llama"):
        (tmp_path / name).symlink_to(hf_folders / name)
    path = write_pipeline(tmp_path, [{"quantize": {"method": "dynamic-int8"}}], task="embedding",
                          model={"source": source, "args": args}, data=text_files(tmp_path))
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{path}:{line_of(path, source)}: " in result.stderr
    assert message.format(tmp=tmp_path) in result.stderr and "Traceback" not in result.output


def test_a_folder_with_modules_hf_does_not_apply_is_refused(bert, tmp_path):
    from compressflow_hf import HFSource

    modules = json.loads((bert / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (bert / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="has a Dense module") as caught:
        HFSource().check(str(bert), {}, context(tmp_path))
    assert "pooling: mean" in caught.value.hint
    HFSource().check(str(bert), {"pooling": "mean"}, context(tmp_path))  # the transformer alone


def test_trusted_only_loads_safetensors_and_refuses_a_pickled_checkpoint(bert, tmp_path, cli, monkeypatch):
    from safetensors.torch import load_file

    expected = embed(load(str(bert), tmp_path), EVAL_LINES)
    weights = load_file(bert / "model.safetensors")
    # beside the safetensors, a pickled checkpoint of other weights: which one loads shows
    torch.save({k: v + 1 for k, v in weights.items()}, bert / "pytorch_model.bin")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for item in bert.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (pickled / item.name).write_bytes(item.read_bytes())
    torch.save(weights, pickled / "pytorch_model.bin")
    path = write_pipeline(tmp_path, [{"quantize": {"method": "dynamic-int8"}}], task="embedding",
                          model={"source": "hf:pickled"}, data=text_files(tmp_path))
    assert cli("validate", path).exit_code == 0  # off: transformers reads it with weights_only
    assert torch.allclose(embed(load("pickled", tmp_path), EVAL_LINES), expected, atol=1e-6)

    monkeypatch.setenv("COMPRESSFLOW_TRUSTED_ONLY", "0")  # the flag switches it on; unset after
    result = cli("validate", path, "--trusted-only")
    assert result.exit_code == 2, result.output
    assert f"{path}:{line_of(path, 'hf:pickled')}: hf: " in result.stderr
    assert "refuses pytorch_model.bin" in result.stderr and "COMPRESSFLOW_TRUSTED_ONLY" in result.stderr
    monkeypatch.setenv("COMPRESSFLOW_TRUSTED_ONLY", "1")
    assert torch.equal(embed(load("bert", tmp_path), EVAL_LINES), expected)  # the safetensors


def test_weights_that_do_not_fit_the_config_are_refused_not_randomly_filled(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(bert / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, bert / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="do not fit its config.json .1 missing"):
        load(str(bert), tmp_path)


def test_a_folder_that_needs_its_own_code_is_refused_and_its_code_never_runs(bert, tmp_path):
    marker = tmp_path / "ran"
    (bert / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((bert / "config.json").read_text())
    config.update(model_type="custom-thing", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModel": "modeling_custom.CustomModel"})
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="the model in .* does not load") as caught:
        load(str(bert), tmp_path)
    assert "trust_remote_code" in caught.value.hint
    assert not marker.exists()


# --- hf:pkg: ----------------------------------------------------------------------------


def test_pkg_names_a_folder_inside_an_installed_package_without_importing_it(hf_folders, tmp_path, monkeypatch):
    import shutil
    import sys

    from compressflow_hf import HFSource

    package = tmp_path / "site" / "weights_pkg"
    shutil.copytree(hf_folders / "bert", package / "model")
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = HFSource()
    assert source.plan("pkg:weights_pkg", {}, context(tmp_path)).folder == package / "model"
    assert source.plan("pkg:weights_pkg/model", {}, context(tmp_path)).folder == package / "model"
    assert "weights_pkg" not in sys.modules
    shutil.copytree(hf_folders / "bert", package / "other")
    with pytest.raises(ConfigError, match="several of its subfolders do: model, other"):
        source.plan("pkg:weights_pkg", {}, context(tmp_path))
    with pytest.raises(ConfigError, match="has no folder 'nowhere'"):
        source.plan("pkg:weights_pkg/nowhere", {}, context(tmp_path))


# --- the folder's content in the stage keys ----------------------------------------------


def test_the_input_key_follows_the_folders_weights(bert, tmp_path):
    from compressflow.engine import validate
    from compressflow_hf import HFSource

    path = write_pipeline(tmp_path, [{"quantize": {"method": "dynamic-int8"}}], model={"source": "hf:bert"},
                          data=text_files(tmp_path), task="embedding", **QUIET)
    before, digest = validate(path).input_key, HFSource().digest("bert", {}, context(tmp_path))
    assert validate(path).input_key == before  # nothing changed, nothing differs
    (bert / ".git").mkdir()
    (bert / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # no loader reads it
    assert HFSource().digest("bert", {}, context(tmp_path)) == digest
    weights = bert / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: same name, same size
    weights.write_bytes(bytes(data))
    assert validate(path).input_key != before
    assert HFSource().digest("missing", {}, context(tmp_path)) is None  # check reports it
