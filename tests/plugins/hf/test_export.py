"""export/hf: a pipeline's model as a folder sentence-transformers loads with the embeddings the
pipeline measured, heads pruned or not; int8 models and non-HF models refused, clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from compressflow import ConfigError
from tests.conftest import write_pipeline
from tests.plugins.hf.conftest import EVAL_LINES
from tests.plugins.hf.test_hf import load, sentence_transformer, text_files

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

BATCH = 4  # text_files' data.batch_size: the engine evaluates in batches of it, in order


def runs_of(store: str, experiment: str) -> dict:
    import mlflow

    mlflow.set_tracking_uri(store)
    return {r.info.run_name: r for r in mlflow.search_runs(experiment_names=[experiment],
                                                            output_format="list")}


def test_a_heads_pruned_model_exports_a_folder_that_embeds_as_the_pipeline_measured(
        tmp_path, store, cli, hf_folders):
    import mlflow

    pytest.importorskip("torch_pruning")
    stages = [{"structured_prune": {"method": "heads", "heads": 0.5, "ffn": 0.5}},
              {"export": {"method": "hf"}}]
    path = write_pipeline(tmp_path, stages, name="hf-export",
                          model={"source": f"hf:{hf_folders / 'bert'}"}, data=text_files(tmp_path),
                          task="embedding", measure={"latency": False},
                          tracking={"log_models": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output

    runs = runs_of(store, "hf-export")
    exported = runs["1-export"]
    assert runs["0-structured_prune"].data.metrics["heads_per_layer"] == 1  # of 2
    assert exported.data.metrics["reload_max_abs_diff"] <= 1e-4
    folder = Path(mlflow.artifacts.download_artifacts(
        run_id=exported.info.run_id, artifact_path="model", dst_path=str(tmp_path / "downloaded")))
    assert exported.data.metrics["folder_bytes"] == sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file())

    embeddings = torch.tensor(sentence_transformer(folder).encode(EVAL_LINES, batch_size=BATCH))
    original = torch.tensor(sentence_transformer(hf_folders / "bert").encode(EVAL_LINES,
                                                                            batch_size=BATCH))
    cosine = torch.nn.functional.cosine_similarity(embeddings, original, dim=-1)
    assert float(cosine.mean()) == pytest.approx(exported.data.metrics["cosine_mean"], abs=1e-5)
    # a random tiny BERT embeds nearly alike whatever goes; still, this is not the input model
    assert float((embeddings - original).abs().max()) > 1e-4
    notes = mlflow.artifacts.load_text(f"runs:/{exported.info.run_id}/notes.txt")
    assert f"{int(exported.data.metrics['folder_bytes']):,} bytes" in notes
    assert "zero heads" in notes


def test_an_int8_model_is_refused_with_the_way_to_a_deployable_int8_file(
        tmp_path, store, cli, hf_folders):
    stages = [{"quantize": {"method": "dynamic-int8"}}, {"export": {"method": "hf"}}]
    path = write_pipeline(tmp_path, stages, name="hf-int8",
                          model={"source": f"hf:{hf_folders / 'bert'}"}, data=text_files(tmp_path),
                          task="embedding", measure={"latency": False},
                          tracking={"log_models": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code in (1, 2), result.output
    assert "stage '1-export'" in result.stderr
    assert "model.encoder.layer.0.attention.self.query is a torch.ao.nn.quantized" in result.stderr
    assert "export: {method: onnx, pass_on: onnxruntime}" in result.stderr
    assert "quantize: {method: ort-dynamic}" in result.stderr
    assert "Traceback" not in result.output


def quantized(model, how: str):
    if how == "dynamic-int8":
        from compressflow_quantize.dynamic import quantize_dynamic_int8

        return quantize_dynamic_int8(model, [], False, False)[0]
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


@pytest.mark.parametrize("how, what", [
    ("dynamic-int8", "is a torch.ao.nn.quantized.dynamic"),
    ("torchao", "is a layer whose weight is a")])
def test_an_int8_model_is_refused_before_anything_is_written(hf_folders, tmp_path, how, what):
    # transformers would write config.json and then fail on (or garble) the packed weights
    model = quantized(copy.deepcopy(load(str(hf_folders / "bert"), tmp_path)), how)
    with pytest.raises(ConfigError, match=f"model.encoder.layer.0.attention.self.query {what}"):
        model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_a_model_not_of_the_hf_source_is_refused(tmp_path, store, cli):
    path = write_pipeline(tmp_path, [{"export": {"method": "hf"}}], name="not-hf",
                          measure={"latency": False}, tracking={"log_models": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 1, result.output
    assert "export/hf: the model is a MLP, not a Hugging Face model" in result.stderr
    assert "source: hf:<folder>" in result.stderr


@pytest.mark.parametrize("folder, problem", [
    ("/tmp/out", "is an absolute path"), ("../out", "climbs out of the work folder"),
    ("", "names no folder"), ("a\\b", "backslash")])
def test_a_folder_outside_the_work_folder_is_refused_at_validation(tmp_path, cli, folder, problem):
    path = write_pipeline(tmp_path, [{"export": {"method": "hf", "folder": folder}}])
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert problem in result.output
