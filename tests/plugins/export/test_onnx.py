"""export/onnx: the exported file runs in onnxruntime with outputs close to torch's, its
latency is logged, the model passes on unchanged, and a torch.ao quantized model is refused
with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compressflow.engine import validate
from compressflow.runner import PipelineRunner
from tests.conftest import write_pipeline


def test_onnx_parity_and_latency_logged(tmp_path, store):
    import onnx
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    path = write_pipeline(tmp_path, [
        {"name": "base", "train": {"epochs": 1}},
        {"name": "onnx", "export": {"method": "onnx", "repeats": 5, "warmup": 1}},
    ], tracking={"log_models": False})
    runner = PipelineRunner(validate(path), tracking_uri=store, keep_models=True)
    ctx = runner.run()
    client = MlflowClient(store)
    run = client.get_run(runner.tracker.last_stage_id)
    metrics = run.data.metrics
    assert 0 <= metrics["onnx_max_abs_diff"] < 1e-4
    assert metrics["onnx_latency_ms_b1"] > 0 and metrics["onnx_latency_ms_b64"] > 0
    logged = Path(client.download_artifacts(run.info.run_id, "model.onnx", str(tmp_path)))
    assert metrics["onnx_bytes"] == logged.stat().st_size
    onnx.checker.check_model(str(logged))
    # the model passes on unchanged
    base, exported = runner.models["base"], runner.models["onnx"]
    for a, b in zip(base.state_dict().values(), exported.state_dict().values()):
        assert torch.equal(a, b)
    assert ctx.results["onnx"].metrics["accuracy"] == ctx.results["base"].metrics["accuracy"]
    # the file from MLflow, on its own: a dynamic batch, the same predictions as torch
    session = ort.InferenceSession(str(logged), providers=["CPUExecutionProvider"])
    inputs = torch.cat([x for x, _ in runner.loader.data_for(runner.spec.data).val])[:37]
    with torch.inference_mode():
        expected = base.eval()(inputs).numpy()
    got = session.run(None, {"input": inputs.numpy()})[0]
    assert got.shape == (37, 10)
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_cnn_exports_with_parity(tmp_path):
    from compressflow import DataSpec
    from compressflow_data.loaders import load_digits_bundle
    from compressflow.task import default_task
    from compressflow_export.onnx_export import export_and_check
    from compressflow_models.zoo import CNN

    torch.manual_seed(0)
    model = CNN(channels=[4, 8], hidden=16).eval()
    data = load_digits_bundle(DataSpec(dataset="digits"), 0, model.input_shape)
    metrics, graph = export_and_check(model, data, tmp_path / "cnn.onnx", default_task(), opset=None,
                                      exporter="auto", threads=1, warmup=1, repeats=3)
    assert 0 <= metrics["onnx_max_abs_diff"] < 1e-4
    inputs = data.example_input(5)
    with torch.inference_mode():
        assert torch.allclose(graph(inputs), model(inputs), atol=1e-4)
    assert metrics["onnx_latency_ms_b1"] > 0 and metrics["onnx_latency_ms_b64"] > 0
    assert metrics["onnx_bytes"] == (tmp_path / "cnn.onnx").stat().st_size
    assert not list(tmp_path.glob("*.data"))  # weights inside the one file


def test_quantized_model_is_refused_with_a_hint(tmp_path):
    from compressflow import StageFailed
    from compressflow_export.onnx_export import export
    from compressflow_models.zoo import MLP
    from compressflow_quantize.dynamic import quantize_dynamic_int8

    quantized, _ = quantize_dynamic_int8(MLP(), [])
    with pytest.raises(StageFailed) as error:
        export(quantized, torch.randn(2, 64), tmp_path / "q.onnx")
    assert "torch.ao quantized layers" in error.value.message
    assert "layers.0 (" in error.value.message
    assert "before quantize/dynamic-int8" in error.value.hint
    assert not (tmp_path / "q.onnx").exists()
