"""SparseGPT and Wanda on an hf: causal LM through a whole pipeline: block by block, to the
target sparsity, perplexity logged after each stage (tiny random Llama built in the test)."""

from __future__ import annotations

import mlflow
import pytest

from tests.conftest import write_pipeline
from tests.plugins.hf.test_hf import QUIET, text_files

pytest.importorskip("transformers")


def test_wanda_and_sparsegpt_stages_prune_an_hf_llama_and_log_perplexity(tmp_path, store, cli, hf_folders):
    data = text_files(tmp_path)
    data["args"].update(window=8, stride=8)
    data["calibration_batches"] = 2
    decoder = {"scope": "layer", "include": ["*.layers.*"], "calibration_batches": 2}
    stages = [{"name": "wanda", "prune": {"method": "wanda", "sparsity": 0.5, **decoder}},
              {"name": "sparsegpt", "prune": {"method": "least-squares", "pattern": "2:4", **decoder}}]
    path = write_pipeline(tmp_path, stages, name="hf-llm-prune", model={"source": f"hf:{hf_folders / 'llama'}"},
                          data=data, task="causal-lm", **QUIET)
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["hf-llm-prune"], filter_string="tags.mlflow.parentRunId != ''")
    figures = {row["tags.mlflow.runName"]: row for _, row in runs.iterrows()}
    assert set(figures) == {"input", "wanda", "sparsegpt"}
    for name in ("input", "wanda", "sparsegpt"):
        assert figures[name]["metrics.perplexity"] > 1
    # the decoder layers hold every weight but the (tied) embedding and the norms
    for name in ("wanda", "sparsegpt"):
        assert figures[name]["metrics.target_sparsity"] == pytest.approx(0.5)
        assert figures[name]["metrics.reconstruction_error"] < figures[name]["metrics.reconstruction_error_magnitude"]
    assert 0.3 < figures["sparsegpt"]["metrics.sparsity"] < 0.5


def test_decode_steps_on_the_prompts_cache_and_match_the_full_forward(hf_folders, tmp_path):
    import torch

    from tests.plugins.hf.test_hf import load

    model = load(str(hf_folders / "llama"), tmp_path)
    inputs = dict(model.tokenizer(["the cat sat on the mat"], return_tensors="pt"))
    with torch.inference_mode():
        state = model.prefill(inputs)
        first, second = model.decode(state), model.decode(state)
        longer = torch.cat([inputs["input_ids"], state["token"]], dim=1)
        full = model(input_ids=longer)
    torch.testing.assert_close(first[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(first, second)  # the cache is cut back: every step is the same work
    assert state["cache"].get_seq_length() == inputs["input_ids"].shape[1]


def test_a_causal_lm_run_times_prefill_and_decode_per_token(tmp_path, store, cli, hf_folders):
    data = text_files(tmp_path)
    data["args"].update(window=8, stride=8)
    path = write_pipeline(tmp_path, [{"name": "pruned", "prune": {"method": "magnitude", "sparsity": 0.5,
                                                                  "include": ["*.layers.*"]}}],
                          name="hf-llm-latency", model={"source": f"hf:{hf_folders / 'llama'}"},
                          data=data, task="causal-lm", tracking={"log_models": False},
                          measure={"batch_sizes": [1], "repeats": 3, "warmup": 1})
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["hf-llm-latency"], filter_string="tags.mlflow.parentRunId != ''")
    for _, row in runs.iterrows():
        for phase in ("prefill", "decode"):
            assert row[f"metrics.latency_ms_per_token_{phase}"] > 0
            assert row[f"metrics.{phase}_speedup_q1"] <= row[f"metrics.{phase}_speedup"] <= row[f"metrics.{phase}_speedup_q3"]


def test_smoothquant_keeps_the_function_then_int8_quantizes(tmp_path, store, hf_folders):
    pytest.importorskip("llmcompressor")
    import torch

    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    data = text_files(tmp_path)
    data["args"].update(window=8, stride=8)
    stages = [{"name": "smoothed", "quantize": {"method": "smoothquant", "quantize": False,
                                                "calibration_batches": 2}},
              {"name": "w8a8", "quantize": {"method": "smoothquant", "calibration_batches": 2}}]
    path = write_pipeline(tmp_path, stages, name="hf-smoothquant", model={"source": f"hf:{hf_folders / 'llama'}"},
                          data=data, task="causal-lm", **QUIET)
    runner = PipelineRunner(validate(path), tracking_uri=store, keep_models=True)
    ctx = runner.run()
    dense, smoothed = runner.models["input"], runner.models["smoothed"]
    norm = "model.model.layers.0.input_layernorm.weight"
    assert not torch.equal(dict(dense.named_parameters())[norm], dict(smoothed.named_parameters())[norm])
    inputs = dict(dense.tokenizer(["the cat sat on the mat"], return_tensors="pt"))
    with torch.inference_mode():
        torch.testing.assert_close(smoothed(**inputs), dense(**inputs), rtol=1e-4, atol=1e-4)
    int8 = ctx.results["w8a8"]
    assert int8.metrics["quantized_layers"] == 14  # 7 a layer; lm_head stays fp32
    assert int8.metrics["size_bytes"] < ctx.results["input"].metrics["size_bytes"]
    assert int8.metrics["perplexity"] > 1
