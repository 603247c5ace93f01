"""OnnxModel and the quantize/ort-* stages on a tensor model: what the engine measures of a
graph run by onnxruntime (bytes, weights, zeros, MACs), its copies, and the refusal of a
torch model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from compressflow import StageFailed
from compressflow.engine import validate
from compressflow.measure import count_macs, count_params, size_bytes
from compressflow.runner import PipelineRunner
from tests.conftest import write_pipeline


@pytest.fixture
def graph(tmp_path):
    from compressflow_export.onnx_export import export
    from compressflow_export.runtime import OnnxModel
    from compressflow_models.zoo import MLP

    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=[32], num_classes=10).eval()
    with torch.no_grad():
        model.layers[0].weight[:, :8] = 0  # zeros the graph must count too
    path, names = export(model, torch.randn(2, 64), tmp_path / "mlp.onnx")
    return model, OnnxModel.from_file(path), path


def test_the_graph_runs_copies_and_pickles_like_the_module(graph):
    model, onnx_model, _ = graph
    inputs = torch.randn(7, 64)
    with torch.inference_mode():
        expected = model(inputs)
        assert torch.allclose(onnx_model(inputs), expected, atol=1e-5)
        assert torch.allclose(onnx_model(input=inputs), expected, atol=1e-5)
        for twin in (copy.deepcopy(onnx_model), pickle.loads(pickle.dumps(onnx_model))):
            assert twin._session is None
            assert torch.equal(twin(inputs), onnx_model(inputs))
    with pytest.raises(TypeError, match="no input tokens"):
        onnx_model(tokens=inputs)
    onnx_model.unused = ["tokens"]  # an input the exporter dropped as unread is ignored
    with torch.inference_mode():
        assert torch.allclose(onnx_model(inputs, tokens=inputs), expected, atol=1e-5)


def test_the_engine_counts_the_graphs_bytes_weights_zeros_and_macs(graph):
    model, onnx_model, path = graph
    assert 0 < size_bytes(onnx_model) - path.stat().st_size < 2_000  # the file, serialized
    assert count_params(onnx_model) == count_params(model)
    assert count_macs(onnx_model, torch.randn(3, 64)) == count_macs(model, torch.randn(3, 64))


def test_onnxruntime_threads_follow_torchs(graph):
    _, onnx_model, _ = graph
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        onnx_model(torch.randn(1, 64))
        first = onnx_model._session
        onnx_model(torch.randn(1, 64))
        assert onnx_model._session is first
        torch.set_num_threads(2)
        onnx_model(torch.randn(1, 64))
        assert onnx_model._session is not first and onnx_model._threads == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("stage", [{"method": "ort-dynamic", "op_types": ["MatMul", "Gemm"]},
                                   {"method": "ort-static", "calibration_batches": 4}])
def test_int8_pipelines_pass_on_smaller_graphs_logged_as_onnx(tmp_path, store, stage):
    import mlflow
    import mlflow.onnx
    import mlflow.pytorch
    import onnxruntime as ort

    from compressflow_export.runtime import OnnxModel

    path = write_pipeline(tmp_path, [
        {"name": "base", "train": {"epochs": 2}},
        {"name": "graph", "export": {"method": "onnx", "pass_on": "onnxruntime", "repeats": 3,
                                     "warmup": 1}},
        {"name": "int8", "quantize": stage},
    ], measure={"repeats": 3, "warmup": 1},
       model={"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [256, 128], "num_classes": 10}})
    runner = PipelineRunner(validate(path), tracking_uri=store, keep_models=True)
    results = runner.run().results
    assert isinstance(runner.models["graph"], OnnxModel) and isinstance(runner.models["int8"], OnnxModel)
    assert results["graph"].metrics["accuracy"] == pytest.approx(results["base"].metrics["accuracy"])
    figures = results["int8"].metrics
    assert figures["size_bytes"] < results["graph"].metrics["size_bytes"] / 2.5
    assert figures["macs"] == results["base"].metrics["macs"]
    assert figures["accuracy"] > results["base"].metrics["accuracy"] - 0.05
    # the graph in MLflow's onnx flavor runs in onnxruntime on its own, as the stage's model
    mlflow.set_tracking_uri(store)
    run = mlflow.get_run(runner.tracker.last_stage_id)
    proto = mlflow.onnx.load_model(run.data.tags["compressflow.onnx_model_uri"])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = torch.randn(5, 64)
    with torch.inference_mode():
        expected = runner.models["int8"](inputs).numpy()
    assert abs(session.run(None, {"input": inputs.numpy()})[0] - expected).max() < 1e-5
    # and the engine's own record (what --resume and --reuse reload) is the same graph
    record = mlflow.pytorch.load_model(run.data.tags["compressflow.model_uri"])
    assert isinstance(record, OnnxModel) and record.graph_bytes() == runner.models["int8"].graph_bytes()


def test_a_torch_model_is_refused_with_the_stage_to_put_first(tmp_path, store):
    path = write_pipeline(tmp_path, [{"quantize": {"method": "ort-dynamic"}}],
                          tracking={"log_models": False}, measure={"latency": False})
    with pytest.raises(StageFailed) as error:
        PipelineRunner(validate(path), tracking_uri=store).run()
    assert "not an ONNX graph" in error.value.message
    assert "pass_on: onnxruntime" in error.value.hint
