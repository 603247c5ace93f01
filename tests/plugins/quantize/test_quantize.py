"""compressflow_quantize: quantize/dynamic-int8 swaps Linear layers for int8 dynamic ones:
smaller on disk, about as accurate, and ``exclude`` keeps a layer in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import write_pipeline

ARCH = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [64, 32], "num_classes": 10}}
QUIET = {"tracking": {"log_models": False}, "measure": {"latency": False}}


def _dynamic_linear():
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


@pytest.fixture(scope="module")
def quantize_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('quantize-store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, quantize_store):
    """train -> quantize everything; then, from the trained weights, quantize all but one layer."""
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    folder = tmp_path_factory.mktemp("quantize")
    uri = quantize_store
    path = write_pipeline(folder, [{"name": "trained", "train": {"epochs": 8, "lr": 0.003}},
                                   {"name": "int8", "quantize": {"method": "dynamic-int8"}}],
                          name="all", model=ARCH, **QUIET)
    everything = PipelineRunner(validate(path), tracking_uri=uri, keep_models=True).run()
    torch.save(everything.results["trained"].model.state_dict(), folder / "trained.pt")
    path = write_pipeline(folder, [{"name": "int8", "quantize": {"exclude": ["layers.4"]}}],
                          name="some", model={"source": "file:trained.pt", "args": {"architecture": ARCH}},
                          **QUIET)
    some = PipelineRunner(validate(path), tracking_uri=uri, keep_models=True).run()
    return everything, some


def test_int8_model_is_smaller_and_about_as_accurate(quantized):
    everything, _ = quantized
    trained, int8 = everything.results["trained"].metrics, everything.results["int8"].metrics
    assert trained["accuracy"] > 0.9
    assert int8["size_bytes"] < 0.6 * trained["size_bytes"]
    assert abs(int8["accuracy"] - trained["accuracy"]) <= 0.01


def test_every_linear_layer_becomes_a_dynamic_int8_one(quantized):
    everything, _ = quantized
    model = everything.results["int8"].model
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    dynamic = {n: m for n, m in model.named_modules() if isinstance(m, _dynamic_linear())}
    assert set(dynamic) == {"layers.0", "layers.2", "layers.4"}
    assert all(m.weight().dtype == torch.qint8 for m in dynamic.values())
    assert everything.results["int8"].metrics["quantized_layers"] == 3
    # the int8 weights approximate the float ones to within a quantization step
    trained = dict(everything.results["trained"].model.named_modules())
    for name, module in dynamic.items():
        weight = module.weight()
        per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        step = float(weight.q_per_channel_scales().max()) if per_channel else weight.q_scale()
        error = float((weight.dequantize() - trained[name].weight.detach()).abs().max())
        assert 0 < error <= step / 2 + 1e-6, name
    # the trained float model it came from is untouched
    assert all(type(m) is not _dynamic_linear() for m in everything.results["trained"].model.modules())


def test_exclude_keeps_a_layer_in_fp32(quantized):
    everything, some = quantized
    model = some.results["int8"].model
    kept = dict(model.named_modules())["layers.4"]
    assert type(kept) is nn.Linear
    trained = dict(everything.results["trained"].model.named_modules())["layers.4"]
    assert torch.equal(kept.weight, trained.weight) and torch.equal(kept.bias, trained.bias)
    assert all(isinstance(dict(model.named_modules())[n], _dynamic_linear()) for n in ("layers.0", "layers.2"))
    metrics = some.results["int8"].metrics
    assert metrics["quantized_layers"] == 2
    # in between: smaller than float, bigger than all-int8
    assert everything.results["int8"].metrics["size_bytes"] < metrics["size_bytes"] \
        < everything.results["trained"].metrics["size_bytes"]
    # the same weights as the first pipeline, so the same accuracy give or take a point
    assert abs(metrics["accuracy"] - everything.results["trained"].metrics["accuracy"]) <= 0.01


def test_excluding_every_layer_is_refused(tmp_path, quantize_store, cli):
    path = write_pipeline(tmp_path, [{"name": "int8", "quantize": {"exclude": ["*"]}}], **QUIET)
    result = cli("run", path, "--tracking-uri", quantize_store, "--quiet")
    assert result.exit_code == 1, result.output  # found while running: a stage failure
    assert "stage 'int8'" in result.stderr
    assert "no Linear layer" in result.stderr
    assert "Traceback" not in result.output
