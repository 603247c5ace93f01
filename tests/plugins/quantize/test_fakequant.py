"""quantize/fake-quant: the integer arithmetic exactly, packed storage that really shrinks,
and a pipeline whose model reloads from MLflow with its accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressflow.measure import count_params, size_bytes
from compressflow_models.zoo import MLP
from compressflow_quantize.fakequant import (
    QuantConv,
    QuantLinear,
    QuantSpec,
    fake_quantize,
    quantizable_layers,
)
from compressflow_quantize.packing import pack, pack_bits, packed_length, unpack, unpack_bits
from tests.conftest import write_pipeline
from tests.plugins.quantize.digits_models import (
    data_for,
    evaluate,
    save_trained,
)


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def spread_weight(rows: int = 12, cols: int = 40, seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges (what per-channel scales are for)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * torch.logspace(-2, 0, rows)[:, None]


def squared_error(weight: torch.Tensor, spec: QuantSpec) -> float:
    module, _ = QuantLinear.from_float(linear_with(weight), spec)
    return float((module.dequantized_weight().double() - weight.double()).pow(2).sum())


# --- the arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_symmetric_integers_are_round_w_over_scale(bits, per_channel):
    weight = spread_weight()
    module, _ = QuantLinear.from_float(linear_with(weight), QuantSpec(bits, True, per_channel))
    qmax = 2 ** (bits - 1) - 1
    rows = weight if per_channel else weight.reshape(1, -1)
    amax = rows.abs().amax(dim=1)
    assert module.scale.shape == (rows.shape[0],)
    torch.testing.assert_close(module.scale, (amax.double() / qmax).float(), rtol=0, atol=0)
    # w_q = round(w * Q), Q = 1 / scale, inside [-qmax, qmax]; the largest |w| lands on qmax
    scale = module.scale.double()[:, None]
    expected = torch.clamp(torch.round(rows.double() / scale), -qmax, qmax).to(torch.int16)
    q = module.int_weight().reshape(rows.shape)
    assert torch.equal(q, expected)
    assert torch.equal(q.abs().amax(dim=1), torch.full((rows.shape[0],), qmax, dtype=torch.int16))
    assert bool((module.zero_point == 2 ** (bits - 1)).all())
    # dequantized = q * scale, and within half a step of w
    dequantized = module.dequantized_weight().reshape(rows.shape)
    assert torch.equal(dequantized, (q.float() * module.scale[:, None]))
    assert bool(((dequantized - rows).abs() <= module.scale[:, None] / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_zero_points_map_min_max_onto_the_codes(bits):
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(6, 30, generator=generator) * 3 - 0.5   # skewed: [-0.5, 2.5)
    weight[2] = torch.rand(30, generator=generator) + 0.1       # all positive: range starts at 0
    weight[3, 7] = 0.0
    module, _ = QuantLinear.from_float(linear_with(weight), QuantSpec(bits, False, True))
    top = 2**bits - 1
    lo = weight.double().amin(dim=1).clamp(max=0)
    hi = weight.double().amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / top).float()
    zero_point = torch.clamp(torch.round(-lo / scale.double()), 0, top)
    torch.testing.assert_close(module.scale, scale, rtol=0, atol=0)
    assert torch.equal(module.zero_point.long(), zero_point.long())
    assert int(module.zero_point[2]) == 0
    codes = module.codes().long()
    expected = torch.clamp(torch.round(weight.double() / scale.double()[:, None]) + zero_point[:, None], 0, top)
    assert torch.equal(codes, expected.long())
    assert int(codes.min()) == 0 and int(codes.max()) == top
    # zero is exact, and w_hat = (u - zero_point) * scale
    assert float(module.dequantized_weight()[3, 7]) == 0.0
    assert torch.equal(module.int_weight(), (codes - zero_point.long()[:, None]).to(torch.int16))
    # on skewed weights the asymmetric grid beats the symmetric one
    assert squared_error(weight, QuantSpec(bits, False, True)) < squared_error(weight, QuantSpec(bits, True, True))


def test_per_channel_scales_fit_each_channel():
    weight = spread_weight()

    def row_errors(per_channel: bool) -> torch.Tensor:
        module, _ = QuantLinear.from_float(linear_with(weight), QuantSpec(4, True, per_channel))
        return (module.dequantized_weight() - weight).pow(2).sum(dim=1)

    per_tensor, per_channel = row_errors(False), row_errors(True)
    assert float(per_channel.sum()) < float(per_tensor.sum())
    # the smallest rows no longer share the largest row's step (a 100x smaller range)
    assert bool((per_channel[:4] < per_tensor[:4] / 20).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_mse_clipping_is_never_worse_than_min_max(bits, symmetric, per_channel):
    generator = torch.Generator().manual_seed(bits)
    # heavy tails (Laplace): a few large weights stretch the min-max range
    uniform = torch.rand(16, 256, generator=generator, dtype=torch.float64) - 0.5
    weight = (-0.1 * uniform.sign() * torch.log1p(-2 * uniform.abs())).float()
    minmax = squared_error(weight, QuantSpec(bits, symmetric, per_channel, "minmax"))
    mse = squared_error(weight, QuantSpec(bits, symmetric, per_channel, "mse"))
    assert mse <= minmax
    if bits <= 4:
        assert mse < 0.95 * minmax  # clipping the tails pays at low bit widths
        module, done = QuantLinear.from_float(linear_with(weight), QuantSpec(bits, symmetric, per_channel, "mse"))
        assert float(done.alpha.min()) < 1.0


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_and_takes_bits_per_code(bits):
    generator = torch.Generator().manual_seed(bits)
    for count in (1, 7, 8, 1001):
        codes = torch.randint(0, 2**bits, (count,), generator=generator, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_length(count, bits) == -(-count * bits // 8)
        assert torch.equal(unpack(packed, bits, count), codes)
        # widths with a fast path keep the one bit-stream layout (stored models still load)
        assert torch.equal(packed, pack_bits(codes, bits)) or bits == 8
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, count), codes)


def test_quant_conv_computes_with_its_dequantized_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1)
    quantized, _ = QuantConv.from_float(conv, QuantSpec(4, False, True, "mse"))
    x = torch.randn(5, 3, 9, 9)
    expected = F.conv2d(x, quantized.dequantized_weight(), conv.bias, 2, 1)
    assert torch.equal(quantized(x), expected)
    assert quantized.int_weight().shape == conv.weight.shape
    with torch.no_grad():
        assert float((quantized(x) - conv(x)).abs().max()) < 0.1 * float(conv(x).abs().max())


# --- storage ------------------------------------------------------------------------------


def test_size_bytes_drops_with_the_bits_and_params_are_still_counted():
    torch.manual_seed(0)
    model = MLP(64, [256, 128], 10).eval()
    fp32 = size_bytes(model)
    sizes = {}
    for bits in (8, 4, 2):
        quantized = MLP(64, [256, 128], 10)
        quantized.load_state_dict(model.state_dict())
        layers = quantizable_layers(quantized, ["*"], [])
        fake_quantize(quantized, layers, lambda _name, b=bits: QuantSpec(b, True, True))
        assert all(isinstance(m, QuantLinear) for m in (quantized.layers[0], quantized.layers[2], quantized.layers[4]))
        assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
        sizes[bits] = size_bytes(quantized)
        # the integer weights are counted as the model's weights (measure reads them)
        assert count_params(quantized)[0] == count_params(model)[0]
        # the bytes of the state: ceil(n * bits / 8) a weight, fp32 scale and bias, uint8 zero point
        state = quantized.state_dict()
        for prefix, (rows, cols) in {"layers.0": (256, 64), "layers.2": (128, 256), "layers.4": (10, 128)}.items():
            assert state[f"{prefix}.qweight"].numel() == -(-rows * cols * bits // 8)
            assert state[f"{prefix}.scale"].dtype == torch.float32 and state[f"{prefix}.scale"].numel() == rows
            assert state[f"{prefix}.zero_point"].dtype == torch.uint8
    ratios = {bits: fp32 / size for bits, size in sizes.items()}
    # torch.save adds a few hundred bytes a tensor; biases and scales stay fp32
    assert 3.4 < ratios[8] < 4.0, ratios   # one code a byte
    assert 6.0 < ratios[4] < 8.0, ratios   # two codes a byte
    assert 9.5 < ratios[2] < 16.0, ratios  # four codes a byte


# --- the stage in a pipeline, reloaded from MLflow ----------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from compressflow.engine import validate
    from compressflow.runner import PipelineRunner

    folder = tmp_path_factory.mktemp("fakequant")
    stages = [{"name": "fq8", "quantize": {"method": "fake-quant", "bits": 8}},
              {"name": "fq4", "quantize": {"method": "fake-quant", "bits": 4,
                                           "scheme": "asymmetric", "scale": "mse",
                                           "layer_bits": {"layers.4": 8}}}]
    path = write_pipeline(folder, [stages[0]], name="fakequant8", model=save_trained(folder, "mlp"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    first = PipelineRunner(validate(path), tracking_uri=uri).run()
    # fake-quant of a fake-quantized model finds no float layer: the 4-bit run starts again
    path = write_pipeline(folder, [stages[1]], name="fakequant4", model=save_trained(folder, "mlp"),
                          tracking={"log_models": False}, measure={"latency": False})
    second = PipelineRunner(validate(path), tracking_uri=uri).run()
    return uri, first, second


def test_fake_quant_keeps_accuracy_and_shrinks(pipeline):
    _, fq8, fq4 = pipeline
    start = fq8.results["input"].metrics
    eight, four = fq8.results["fq8"].metrics, fq4.results["fq4"].metrics
    assert eight["accuracy"] >= start["accuracy"] - 0.005
    assert four["accuracy"] >= start["accuracy"] - 0.02
    assert 3.0 < eight["size_ratio"] < 4.0
    assert four["size_ratio"] > 4.5
    model4 = fq4.results["fq4"].model
    assert [m.bits for m in model4.modules() if isinstance(m, QuantLinear)] == [4, 4, 8]
    assert not any(m.symmetric for m in model4.modules() if isinstance(m, QuantLinear))


def test_fake_quant_model_reloads_from_mlflow_with_its_accuracy(pipeline):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    uri, fq8, _ = pipeline
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fakequant8")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'fq8'")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(run.data.tags["compressflow.model_uri"])
    assert isinstance(model.layers[0], QuantLinear)
    assert model.layers[0].qweight.dtype == torch.uint8
    assert evaluate(model, data_for(model).val)["accuracy"] == pytest.approx(run.data.metrics["accuracy"])
    assert run.data.metrics["size_bytes"] == size_bytes(model)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "fake_quant_layers.md" in artifacts
