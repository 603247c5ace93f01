"""Block-by-block calibration (compressflow.calibration), and SparseGPT and Wanda on it, on a tiny random
Llama built here (2 decoder layers, hidden 64), the shape SmolLM2 has at full size."""

from __future__ import annotations

import copy

import pytest
import torch

from compressflow.task import call
from compressflow import calibration
from compressflow_prune.masks import make_plan, prunable_layers
from compressflow_prune.obs import least_squares_prune, sparsegpt, wanda

transformers = pytest.importorskip("transformers")


class TinyLM(torch.nn.Module):
    """A Llama taking input_ids, returning logits, as hf: wraps one."""

    def __init__(self, layers: int = 2):
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=layers, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64)
        self.model = transformers.LlamaForCausalLM(config).eval()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def batches(count: int = 3, length: int = 24):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 96, (2, length), generator=generator), None) for _ in range(count)]


def plan_for(model, include, sparsity=0.5, n_m=None):
    layers = prunable_layers(model, include, [])
    return layers, make_plan(layers, sparsity, "layer", {}, n_m)


def test_the_decoder_layers_are_the_blocks():
    model = TinyLM()
    names = list(prunable_layers(model, ["*.layers.*"], []))
    blocks = calibration.repeated_blocks(model, names)
    assert [name for name, _ in blocks] == ["model.model.layers.0", "model.model.layers.1"]
    assert calibration.repeated_blocks(model, [*names, "model.lm_head"]) is None  # outside them
    assert len(calibration.layers_in("model.model.layers.1", dict.fromkeys(names))) == 7


def test_block_inputs_are_the_true_inputs_of_each_block():
    model, data = TinyLM(), batches()
    blocks = calibration.repeated_blocks(model, ["model.model.layers.0.mlp.up_proj",
                                                "model.model.layers.1.mlp.up_proj"])
    seen: list[torch.Tensor] = []
    handle = blocks[1][1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for inputs, _ in data:
            call(model, inputs)
    handle.remove()
    calls = calibration.first_block_inputs(model, blocks[0][1], data)
    following = calibration.run_block(blocks[0][1], calls)
    for expected, (args, _kwargs) in zip(seen, following):
        torch.testing.assert_close(args[0], expected)


def test_one_layer_per_block_prunes_exactly_as_layer_by_layer(monkeypatch):
    # down_proj's inputs pass through the pruned earlier block either way: equal weights
    blockwise, layerwise, data = TinyLM(), TinyLM(), batches()
    for model in (blockwise, layerwise):
        layers, plan = plan_for(model, ["*.mlp.down_proj"])
        if model is layerwise:
            monkeypatch.setattr(calibration, "repeated_blocks", lambda *a: None)
        least_squares_prune(model, layers, plan, data)
    for (name, a), b in zip(blockwise.named_parameters(), layerwise.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert float((blockwise.model.model.layers[1].mlp.down_proj.weight == 0).float().mean()) == 0.5


def test_each_block_runs_at_most_twice_per_batch():
    model, data = TinyLM(layers=3), batches()
    runs = {i: 0 for i in range(3)}
    for i, block in enumerate(model.model.model.layers):
        block.register_forward_hook(lambda *a, i=i: runs.__setitem__(i, runs[i] + 1))  # runs done
    layers, plan = plan_for(model, ["*.layers.*"])
    records = least_squares_prune(model, layers, plan, data)
    assert runs == {0: 2 * len(data), 1: 2 * len(data), 2: len(data)}  # the last: no outputs
    assert len(records) == 21
    for name, record in records.items():
        assert record["reconstruction_error"] < record["magnitude_error"], name


def test_wanda_ranks_weight_times_input_norm_within_each_row():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    x = torch.tensor([[2.0, 0.1, 1.0, 3.0]] * 5).t()  # inputs' norms per column
    hessian = (x @ x.t()).double() / 5
    new, keep = wanda(weight, hessian, count=4)
    # |w| * ||x||: row 0: 2, 0.2, 3, 1.5 -> drop 0.2 and 1.5; row 1: 8, 0.1, 1, 6 -> drop 0.1, 1
    assert keep.tolist() == [[True, False, True, False], [True, False, False, True]]
    assert torch.equal(new, weight * keep)
    _, keep = wanda(weight, hessian, n_m=(2, 4))
    assert keep.sum(1).tolist() == [2, 2]
    forced = torch.tensor([[False, False, True, False], [False] * 4])
    _, keep = wanda(weight, hessian, count=2, forced=forced)
    assert keep.tolist() == [[True, True, False, True], [True, False, True, True]]


@pytest.mark.parametrize("blockwise", [True, False], ids=["by-block", "by-layer"])
def test_wanda_without_errors_collects_only_the_diagonal_and_prunes_the_same(monkeypatch, blockwise):
    if not blockwise:
        monkeypatch.setattr(calibration, "repeated_blocks", lambda *a: None)
    full, diagonal, data = TinyLM(), TinyLM(), batches()
    for model, errors in ((full, True), (diagonal, False)):
        layers, plan = plan_for(model, ["*.layers.*"])
        records = least_squares_prune(model, layers, plan, data, solve=wanda, errors=errors)
        assert all(records.values()) is errors  # the errors need the whole H
    for (name, a), b in zip(full.named_parameters(), diagonal.parameters()):
        assert torch.equal(a == 0, b == 0), name
    hessians = next(calibration.layer_hessians(diagonal, layers, data, diagonal=True))
    assert all(h.dim() == 1 for h in hessians.values())


@pytest.mark.parametrize("solve", [sparsegpt, wanda], ids=["least-squares", "wanda"])
@pytest.mark.parametrize("n_m", [None, (2, 4)], ids=["50%", "2:4"])
def test_llama_prunes_to_target_and_keeps_its_output_closer_than_magnitude(solve, n_m):
    model, data = TinyLM(), batches()
    dense = copy.deepcopy(model)
    layers, plan = plan_for(model, ["*.layers.*"], n_m=n_m)
    records = least_squares_prune(model, layers, plan, data, solve=solve)
    for name, layer in layers.items():
        weight = layer.weight.detach()
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
        if n_m:
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()
    mean = sum(r["reconstruction_error"] for r in records.values()) / len(records)
    baseline = sum(r["magnitude_error"] for r in records.values()) / len(records)
    assert mean < baseline
    inputs = batches(1, 16)[0][0]
    with torch.no_grad():
        assert not torch.allclose(call(dense, inputs), call(model, inputs))


def test_layers_fed_the_same_input_share_one_hessian_equal_to_their_own():
    from compressflow.calibration import layer_columns

    model, data = TinyLM(), batches()
    blocks = calibration.repeated_blocks(model, ["model.model.layers.0.mlp.up_proj"])
    name, block = blocks[0]
    inside = calibration.layers_in(name, prunable_layers(model, ["*.layers.0.*"], []))
    calls = calibration.first_block_inputs(model, block, data)
    hessians = calibration.block_hessians(block, inside, calls, layer_columns)
    attention, mlp = f"{name}.self_attn", f"{name}.mlp"
    assert hessians[f"{attention}.q_proj"] is hessians[f"{attention}.k_proj"] is hessians[f"{attention}.v_proj"]
    assert hessians[f"{mlp}.gate_proj"] is hessians[f"{mlp}.up_proj"]
    distinct = {id(h) for h in hessians.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    alone = calibration.block_hessians(block, {f"{attention}.k_proj": inside[f"{attention}.k_proj"]},
                                      calls, layer_columns)
    torch.testing.assert_close(alone[f"{attention}.k_proj"], hessians[f"{attention}.q_proj"])
