"""export/packed: Huffman and relative-index streams round-trip, the file rebuilds a model with
bit-identical outputs, and compressed_bytes is the file's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressflow import CompressflowError
from compressflow.engine import validate
from compressflow.runner import PipelineRunner
from compressflow_export import huffman
from compressflow_export.packed import (
    PackOptions,
    load_packed,
    positions_from,
    read_packed,
    relative_indices,
    save_packed,
)
from compressflow_models.zoo import CNN, MLP, ResNet
from tests.conftest import write_pipeline

# --- Huffman --------------------------------------------------------------------------------


@pytest.mark.parametrize("alphabet, count, p", [(1, 50, 0.5), (2, 1, 0.5), (16, 3000, 0.3),
                                                 (256, 20000, 0.05), (256, 5000, 0.9)])
def test_huffman_round_trip(alphabet, count, p):
    rng = np.random.default_rng(alphabet + count)
    symbols = np.minimum(rng.geometric(p, size=count) - 1, alphabet - 1)
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = huffman.code_lengths(counts)
    assert lengths.max() <= huffman.MAX_LENGTH
    assert np.all((lengths > 0) == (counts > 0))
    present = lengths[lengths > 0]
    kraft = np.sum(2.0 ** -present)
    assert kraft == 1.0 or (len(present) == 1 and kraft == 0.5)  # complete prefix code
    data = huffman.encode(symbols, lengths)
    assert len(data) == -(-huffman.stream_bits(counts, lengths) // 8)
    assert np.array_equal(huffman.decode(data, lengths, count), symbols)
    # never worse than fixed width, and close to the entropy
    assert huffman.stream_bits(counts, lengths) <= count * huffman.fixed_width(alphabet)
    probabilities = counts[counts > 0] / count
    entropy = -np.sum(probabilities * np.log2(probabilities)) * count
    assert huffman.stream_bits(counts, lengths) <= entropy + count


def test_huffman_length_limit_keeps_codes_decodable():
    counts = np.array([2 ** i for i in range(30)])  # optimal code would be 29 bits deep
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == huffman.MAX_LENGTH and np.sum(2.0 ** -lengths) <= 1.0
    symbols = np.repeat(np.arange(30), np.minimum(counts, 40))
    np.random.default_rng(0).shuffle(symbols)
    assert np.array_equal(huffman.decode(huffman.encode(symbols, lengths), lengths, len(symbols)),
                          symbols)


def test_fixed_width_round_trip():
    symbols = np.array([0, 7, 3, 5, 1, 6])
    width = huffman.fixed_width(8)
    data = huffman.pack_fixed(symbols, width)
    assert width == 3 and len(data) == 3  # 18 bits
    assert np.array_equal(huffman.unpack_fixed(data, width, len(symbols)), symbols)


# --- relative indices -----------------------------------------------------------------------


def test_relative_indices_insert_fillers_when_a_gap_overflows():
    # 4-bit gaps: 15 is the filler ("15 zeros, no value"); 39 zeros = 15 + 15 + 9
    assert relative_indices(np.array([0, 40]), 4).tolist() == [0, 15, 15, 9]
    assert relative_indices(np.array([3, 19]), 4).tolist() == [3, 15, 0]  # a gap of exactly 15
    assert relative_indices(np.array([5, 6, 20]), 4).tolist() == [5, 0, 13]
    for positions in ([0, 40], [3, 19], [5, 6, 20], [100], list(range(0, 500, 37))):
        for bits in (2, 4, 5, 8):
            codes = relative_indices(np.array(positions), bits)
            assert codes.max(initial=0) < 2 ** bits
            assert positions_from(codes, bits).tolist() == positions


def test_packed_tensor_with_overflowing_gaps(tmp_path):
    weight = torch.zeros(4, 50)
    weight[0, 0], weight[1, 40], weight[3, 49] = 0.5, -1.25, 3.0  # gaps 89 and 58
    model = nn.Linear(50, 4)
    with torch.no_grad():
        model.weight.copy_(weight)
    report = save_packed(model, tmp_path / "m.cfpk", PackOptions(index_bits=4))
    row = report.tensors[0]
    assert row["encoding"] == "sparse" and row["index_bits"] == 4 and row["nonzero"] == 3
    _, tensors = read_packed(tmp_path / "m.cfpk")
    assert torch.equal(tensors[0], weight) and torch.equal(tensors[1], model.bias.detach())


# --- whole models ---------------------------------------------------------------------------


def _prune_and_share(model: nn.Module, keep: float, levels: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                scale = p.abs().max()
                p.copy_(torch.round(p / scale * levels) / levels * scale)
                p.mul_(torch.rand_like(p) < keep)
    return model


@pytest.mark.parametrize("build", [MLP, CNN, ResNet])
@pytest.mark.parametrize("prepare", ["dense", "pruned+shared"])
def test_round_trip_is_bit_identical(tmp_path, build, prepare):
    torch.manual_seed(1)
    model = build()
    if prepare != "dense":
        _prune_and_share(model, keep=0.1, levels=3)
    inputs = torch.randn(32, *model.input_shape)
    model.train()
    model(inputs)  # BatchNorm running statistics become real values
    model.eval()
    report = save_packed(model, tmp_path / "m.cfpk")
    assert report.total == (tmp_path / "m.cfpk").stat().st_size
    rebuilt = load_packed(tmp_path / "m.cfpk", like=build())
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.inference_mode():
        assert torch.equal(model(inputs), rebuilt.eval()(inputs))
    encodings = {row["encoding"] for row in report.tensors}
    if prepare == "dense":
        assert report.total < 1.02 * sum(t.numel() * 4 for t in model.state_dict().values())
    else:
        assert "sparse" in encodings
        assert any(row.get("codebook_size", 99) <= 7 for row in report.tensors)


def test_every_part_is_smaller_than_the_one_before(tmp_path):
    model = _prune_and_share(MLP(), keep=0.08, levels=3)
    sizes = []
    for options in (PackOptions(sparse=False, codebook=False, huffman=False, fp16=False),
                    PackOptions(codebook=False, huffman=False, fp16=False),
                    PackOptions(huffman=False), PackOptions()):
        sizes.append(save_packed(model, tmp_path / "m.cfpk", options).total)
        assert torch.equal(load_packed(tmp_path / "m.cfpk", MLP()).layers[0].weight,
                           model.layers[0].weight)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
    assert sizes[0] / sizes[-1] > 15


def test_another_architecture_is_refused(tmp_path):
    save_packed(MLP(), tmp_path / "m.cfpk")
    with pytest.raises(CompressflowError, match="another architecture"):
        load_packed(tmp_path / "m.cfpk", like=MLP(hidden=[300, 99]))
    (tmp_path / "bad.cfpk").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(CompressflowError, match="not a compressflow packed file"):
        load_packed(tmp_path / "bad.cfpk", like=MLP())
    data = (tmp_path / "m.cfpk").read_bytes()
    (tmp_path / "cut.cfpk").write_bytes(data[:-10])
    with pytest.raises(CompressflowError, match="truncated|corrupt"):
        load_packed(tmp_path / "cut.cfpk", like=MLP())


def test_a_quantized_model_is_refused_clearly(tmp_path):
    from compressflow_quantize.dynamic import quantize_dynamic_int8

    quantized, _ = quantize_dynamic_int8(MLP(), [])
    with pytest.raises(CompressflowError, match="quantize/kmeans"):
        save_packed(quantized, tmp_path / "q.cfpk")


# --- in a pipeline, into MLflow -------------------------------------------------------------


def test_pipeline_packed_file_is_the_model(tmp_path, store):
    from mlflow.tracking import MlflowClient

    path = write_pipeline(tmp_path, [
        {"name": "base", "train": {"epochs": 2, "lr": 0.003}},
        {"name": "dense", "export": {"method": "packed"}},
        {"name": "cut", "prune": {"sparsity": 0.85}},
        {"name": "shared", "quantize": {"method": "kmeans", "bits": 3, "bias_fp16": True}},
        {"name": "packed", "export": {"method": "packed", "filename": "digits.cfpk"}},
    ], measure={"latency": False})
    runner = PipelineRunner(validate(path), tracking_uri=store, keep_models=True)
    ctx = runner.run()
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("test").experiment_id])}
    val = torch.cat([x for x, _ in runner.loader.data_for(runner.spec.data).val])
    for before, name, filename in (("base", "dense", "model.cfpk"), ("shared", "packed", "digits.cfpk")):
        run = runs[name]
        logged = Path(client.download_artifacts(run.info.run_id, filename, str(tmp_path / name)))
        metrics = run.data.metrics
        assert metrics["compressed_bytes"] == logged.stat().st_size
        assert metrics["compressed_bytes"] == sum(
            metrics[f"packed_{p}_bytes"] for p in ("header", "index", "values", "codebook", "plain"))
        assert metrics["compressed_ratio"] == pytest.approx(
            runs["input"].data.metrics["size_bytes"] / metrics["compressed_bytes"])
        # the model passed on (and logged) is the one rebuilt from the file: same outputs, bit
        # for bit, as the stage before; and the file from MLflow rebuilds it too
        with torch.inference_mode():
            expected = runner.models[before].eval()(val)
            assert torch.equal(runner.models[name].eval()(val), expected)
            assert torch.equal(load_packed(logged, like=runner.models["input"]).eval()(val), expected)
        assert metrics["accuracy"] == runs[before].data.metrics["accuracy"]
    dense = runs["dense"].data.metrics  # raw fp32 plus a few bytes a tensor: nothing to gain
    assert 4 * dense["params_total"] < dense["compressed_bytes"] < 4 * dense["params_total"] + 64
    assert runs["packed"].data.metrics["compressed_ratio"] > 15
    assert runs["packed"].data.metrics["packed_codebook_bytes"] > 0
    row = ctx.summary[-1]
    assert row["compressed_bytes"] == runs["packed"].data.metrics["compressed_bytes"]
    # the packed model is logged as an ordinary torch model
    import mlflow.pytorch

    mlflow.set_tracking_uri(store)
    loaded = mlflow.pytorch.load_model(runs["packed"].data.tags["compressflow.model_uri"])
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(val), expected)
