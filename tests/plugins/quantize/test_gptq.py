"""quantize/gptq and group-wise fake-quant: GPTQ's arithmetic on single layers, then the stage
on a tiny random Llama through a pipeline (hf:, causal-lm, text windows)."""

from __future__ import annotations

import pytest
import torch

from compressflow import ConfigError
from compressflow_quantize.fakequant import QuantLinear, QuantSpec, check_groups, quantize_weight
from compressflow_quantize.gptq import dequantize, gptq, output_error

SPEC = QuantSpec(bits=4, symmetric=True, per_channel=True, group_size=16)


def layer_and_inputs(rows=24, columns=64, samples=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5
    x = torch.randn(samples, columns, generator=generator) @ (torch.eye(columns) + 2 * mixing)
    return weight, (x.t() @ x).double() / samples


def rtn(weight, spec=SPEC):
    done = quantize_weight(weight, spec)
    shape = (weight.shape[0], -1)
    return dequantize(done.codes.view(weight.shape), done.scale.view(shape), done.zero_point.view(shape))


def test_groups_scale_each_run_of_consecutive_weights_on_its_own():
    weight = torch.cat([torch.full((2, 16), 0.1), torch.full((2, 16), 10.0)], dim=1)
    weight[:, 0] = -0.05
    module, done = QuantLinear.from_float(torch.nn.Linear(32, 2, bias=False).requires_grad_(False), SPEC)
    module.set_weight(weight, SPEC)
    assert module.scale.shape == (4,)  # 2 rows x 2 groups
    torch.testing.assert_close(module.dequantized_weight(), weight, atol=0.1 / 7, rtol=0)
    per_channel = QuantSpec(bits=4, symmetric=True, per_channel=True)
    coarse, _ = QuantLinear.from_float(torch.nn.Linear(32, 2), per_channel)
    coarse.set_weight(weight, per_channel)
    assert (coarse.dequantized_weight()[:, :16] == 0).all()  # one scale of 10/7 rounds 0.1 away
    assert "group 16" in repr(module)


def test_a_group_that_does_not_divide_a_row_names_the_layer_and_the_sizes_that_do():
    with pytest.raises(ConfigError, match="group_size 128 does not divide the 576 weights of a "
                                          "channel of model.layers.0.mlp.up_proj") as caught:
        check_groups("model.layers.0.mlp.up_proj", torch.nn.Linear(576, 8), 128)
    assert "32, 64, 96, 192" in caught.value.hint


def test_with_uncorrelated_inputs_gptq_is_round_to_nearest():
    weight, _ = layer_and_inputs()
    codes, scale, zero_point = gptq(weight, torch.eye(64, dtype=torch.float64), SPEC, act_order=False)
    torch.testing.assert_close(dequantize(codes, scale, zero_point), rtn(weight))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_the_output_closer_than_round_to_nearest_on_the_same_grid(act_order):
    weight, hessian = layer_and_inputs()
    codes, scale, zero_point = gptq(weight, hessian, SPEC, act_order=act_order)
    assert codes.min() >= 1 and codes.max() <= 15 and torch.equal(codes, codes.round())
    new = dequantize(codes, scale, zero_point)
    torch.testing.assert_close(scale, quantize_weight(weight, SPEC).scale.view(24, 4))  # static groups
    assert output_error(weight, new, hessian) < 0.7 * output_error(weight, rtn(weight), hessian)


def test_pruned_weights_stay_zero():
    weight, hessian = layer_and_inputs()
    weight[:, ::2] = 0
    codes, scale, zero_point = gptq(weight, hessian, SPEC)
    new = dequantize(codes, scale, zero_point)
    assert (new[:, ::2] == 0).all() and (new[:, 1::2] != 0).float().mean() > 0.8
    spread, _, _ = gptq(weight, hessian, SPEC, keep_zeros=False)
    assert (dequantize(spread, scale, zero_point)[:, ::2] != 0).any()


def test_the_gptq_stage_quantizes_an_hf_llama_in_a_pipeline(tmp_path, store, cli):
    pytest.importorskip("transformers")
    import mlflow

    from tests.conftest import write_pipeline
    from tests.plugins.hf.conftest import tiny_llama
    from tests.plugins.hf.test_hf import QUIET, text_files

    tiny_llama(tmp_path / "llama")
    data = text_files(tmp_path)
    data["args"].update(window=8, stride=8)
    decoder = {"bits": 4, "group_size": 16, "include": ["*.layers.*"], "calibration_batches": 2}
    stages = [{"name": "gptq", "quantize": {"method": "gptq", **decoder}}]
    path = write_pipeline(tmp_path, stages, name="hf-gptq", model={"source": "hf:llama"}, data=data,
                          task="causal-lm", **QUIET)
    result = cli("run", path, "--tracking-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["hf-gptq"], filter_string="tags.mlflow.parentRunId != ''")
    figures = {row["tags.mlflow.runName"]: row for _, row in runs.iterrows()}
    gptq_run = figures["gptq"]
    assert gptq_run["metrics.quantized_layers"] == 14
    assert gptq_run["metrics.output_error"] < gptq_run["metrics.output_error_rtn"]
    assert gptq_run["metrics.size_bytes"] < figures["input"]["metrics.size_bytes"]
    assert gptq_run["metrics.perplexity"] > 1


def test_full_range_is_compressed_tensors_int4_grid():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    groups = weight.reshape(8, 4, 16)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    theirs = fake_quantize(weight, scale, zero_point, args)
    full = QuantSpec(bits=4, symmetric=True, per_channel=True, group_size=16, full_range=True)
    ours = rtn(weight, full)
    # the same levels and scales; only a group's largest magnitude, exactly half-way (7.5
    # levels) before rounding, may fall either way by the last bit of float32
    at_max = (groups.abs() == groups.abs().amax(-1, keepdim=True)).reshape(8, 64)
    torch.testing.assert_close(ours[~at_max], theirs[~at_max])
    step = scale.repeat_interleave(16, dim=1)
    assert ((ours - theirs).abs() <= step * 1.001)[at_max].all()
    assert not torch.allclose(rtn(weight), theirs)  # the restricted grid (-7..7) is another
    codes, _, _ = gptq(weight, torch.eye(64, dtype=torch.float64), full, act_order=False)
    assert codes.min() == 0  # level -8 is used
