"""A Hugging Face encoder through export/onnx (token inputs, dynamic batch and sequence axes)
and onnxruntime's int8: the saved folder is what onnxruntime users load, and it gives the
cosine the run logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_pipeline
from tests.plugins.hf.conftest import EVAL_LINES
from tests.plugins.hf.test_hf import sentence_transformer, text_files

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_the_int8_graph_and_its_tokenizer_load_in_onnxruntime_and_give_the_logged_cosine(
        tmp_path, store, hf_folders):
    import mlflow
    import onnxruntime as ort
    from transformers import AutoTokenizer

    (tmp_path / "model").symlink_to(hf_folders / "bert")
    path = write_pipeline(tmp_path, [
        {"export": {"method": "onnx", "pass_on": "onnxruntime", "repeats": 3, "warmup": 1}},
        {"quantize": {"method": "ort-dynamic"}},
    ], name="bert-ort", model={"source": "hf:model"}, data=text_files(tmp_path), task="embedding",
        measure={"repeats": 3, "warmup": 1, "batch_sizes": [4]})
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    runner = PipelineRunner(validate(path), tracking_uri=store, keep_models=True)
    ctx = runner.run()
    figures = ctx.results["1-quantize"].metrics
    lengths = runner.measurer.lengths
    assert len(lengths) == 2 and lengths[0] < lengths[1]  # the eval lines' median and p95
    for length in lengths:
        assert figures[f"latency_ms_b4_t{length}"] > 0 and f"latency_b4_t{length}_speedup" in figures
    assert figures["latency_b4_speedup"] == figures[f"latency_b4_t{lengths[0]}_speedup"]
    ops = {node.op_type for node in runner.models["1-quantize"].proto().graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops  # (a 32-wide model is not smaller)
    assert figures["macs"] == ctx.results["0-export"].metrics["macs"] > 0

    mlflow.set_tracking_uri(store)
    run = mlflow.get_run(runner.tracker.last_stage_id)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="onnx",
                                                      dst_path=str(tmp_path / "got")))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    wanted = {i.name for i in session.get_inputs()}
    ours = []
    for start in range(0, len(EVAL_LINES), 4):  # the evaluated batches, as the run had them
        encoded = tokenizer(EVAL_LINES[start:start + 4], padding=True, truncation=True,
                            max_length=32, return_tensors="np")
        ours.append(session.run(None, {k: v for k, v in encoded.items() if k in wanted})[0])
    ours = np.concatenate(ours)
    theirs = sentence_transformer(hf_folders / "bert").encode(EVAL_LINES)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert float(cosine.mean()) == pytest.approx(run.data.metrics["cosine_mean"], abs=1e-5)
    assert float(cosine.min()) == pytest.approx(run.data.metrics["cosine_min"], abs=1e-5)
    # one file for every batch size and length
    long = tokenizer([" ".join(EVAL_LINES)] * 3, truncation=True, max_length=40, return_tensors="np")
    assert session.run(None, {k: v for k, v in long.items() if k in wanted})[0].shape == (3, 32)
