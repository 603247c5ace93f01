"""export/compressed-tensors: GPTQ's int4 codes written as llm-compressor writes them (packed
int4, group scales), loaded back by transformers with the same outputs and perplexity (tiny
random Llama built in the test)."""

from __future__ import annotations

import json

import mlflow
import pytest

from tests.conftest import write_pipeline
from tests.plugins.hf.test_hf import QUIET, text_files

pytest.importorskip("compressed_tensors")


def run_export(tmp_path, store, cli, hf_folders, scheme: str, name: str) -> dict:
    data = text_files(tmp_path)
    data["args"].update(window=8, stride=8)
    quantize = {"method": "gptq", "bits": 4, "group_size": 16, "scheme": scheme,
                "include": ["*.layers.*"], "calibration_batches": 2}
    stages = [{"name": "plain", "export": {"method": "hf", "folder": "plain"}},
              {"name": "gptq", "quantize": quantize},
              {"name": "packed", "export": {"method": "compressed-tensors"}}]
    path = write_pipeline(tmp_path, stages, name=name, model={"source": f"hf:{hf_folders / 'llama'}"},
                          data=data, task="causal-lm", **QUIET)
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=[name], filter_string="tags.mlflow.parentRunId != ''")
    return {row["tags.mlflow.runName"]: row for _, row in runs.iterrows()}


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_gptq_int4_is_written_packed_and_transformers_reproduces_the_perplexity(
        tmp_path, store, cli, hf_folders, scheme):
    import torch
    from safetensors import safe_open

    figures = run_export(tmp_path, store, cli, hf_folders, scheme, f"ct-{scheme}")
    packed = figures["packed"]
    assert packed["metrics.integer_layers"] == 14
    # transformers' from_pretrained (through hf:) gives the model's logits and the figure
    # the engine logged for the model
    assert packed["metrics.reload_max_abs_diff"] <= 1e-4
    assert packed["metrics.reloaded_perplexity"] == pytest.approx(packed["metrics.perplexity"], rel=1e-5)
    assert packed["metrics.perplexity"] == pytest.approx(figures["gptq"]["metrics.perplexity"], rel=1e-6)

    folder = next(tmp_path.rglob("model/config.json")).parent
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 16, scheme == "symmetric")
    with safe_open(str(folder / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        q_proj = tensors.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert q_proj.dtype == torch.int32 and q_proj.shape == (32, 32 // 8)  # eight int4 codes an int32
    assert ("model.layers.0.self_attn.q_proj.weight_zero_point" in names) == (scheme == "asymmetric")
    notes = mlflow.artifacts.load_text(f"runs:/{packed['run_id']}/notes.txt")
    assert "format pack-quantized" in notes and "no sparse format" in notes
    # the input model's float32 folder is larger on disk
    assert packed["metrics.folder_bytes"] < figures["plain"]["metrics.folder_bytes"]


def test_a_model_with_no_integer_layer_is_written_dense_and_says_sparsity_is_not_encoded(
        tmp_path, hf_folders):
    import torch

    from compressflow_hf.compressed import write
    from tests.plugins.hf.test_hf import load

    model = load(str(hf_folders / "llama"), tmp_path)
    with torch.no_grad():
        model.model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    assert write(model, tmp_path / "out") == "dense"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config or not config["quantization_config"].get("config_groups")


def test_a_model_not_of_the_hf_source_is_refused(tmp_path, store, cli):
    path = write_pipeline(tmp_path, [{"export": {"method": "compressed-tensors"}}], name="ct-mlp",
                          measure={"latency": False}, tracking={"log_models": False})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 1, result.output  # the stage fails; the input run is kept
    assert "export/compressed-tensors: the model is a MLP, not a Hugging Face model" in result.stderr
    assert "Traceback" not in result.stderr
