"""quantize/dynamic-int8 with ``embeddings: true``: nn.Embedding weights become 8-bit rows
(torch.ao weight-only, float scale and zero point per row) beside the int8 Linear layers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from compressflow import ConfigError
from compressflow.measure import count_params, size_bytes, weight_tensors

VOCAB, DIM = 400, 32


class Bag(nn.Module):
    """Token ids [batch, length] -> Embedding -> mean over tokens -> Linear -> Linear."""

    def __init__(self, **embedding) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0, **embedding)
        self.hidden = nn.Linear(DIM, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.emb(ids).mean(dim=1))))


def _model(**embedding) -> nn.Module:
    torch.manual_seed(0)
    return Bag(**embedding).eval()


def _ids() -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (8, 12), generator=torch.Generator().manual_seed(1))
    ids[:, -3:] = 0  # padding
    return ids


def _quantize(model: nn.Module, **params):
    from compressflow_quantize import DynamicInt8

    stage = DynamicInt8("int8", DynamicInt8.Params(**params))
    return stage.run(copy.deepcopy(model), None)


def _quantized_embedding():
    from torch.ao.nn.quantized import Embedding

    return Embedding


def test_embedding_becomes_an_8bit_weight_only_one():
    result = _quantize(_model(), embeddings=True)
    emb = result.model.emb
    assert isinstance(emb, _quantized_embedding())
    weight = emb.weight()
    assert weight.dtype == torch.quint8
    assert weight.qscheme() == torch.per_channel_affine_float_qparams
    assert weight.shape == (VOCAB, DIM)
    from torch.ao.nn.quantized.dynamic import Linear

    assert isinstance(result.model.hidden, Linear) and isinstance(result.model.head, Linear)
    assert result.metrics["quantized_layers"] == 3
    assert result.notes == ["int8 weights in 2 Linear layers and 1 Embedding layers "
                            "(8-bit rows, weight-only)"]
    # every row within half a quantization step of its float values; the padding row stays 0
    float_weight = _model().emb.weight.detach()
    error = (weight.dequantize() - float_weight).abs().max(dim=1).values
    steps = weight.q_per_channel_scales()
    assert bool((error <= steps / 2 + 1e-6).all())
    assert torch.equal(weight.dequantize()[0], torch.zeros(DIM))


def test_embeddings_make_it_smaller_than_linear_only_and_stay_close():
    model, ids = _model(), _ids()
    linear_only = _quantize(model).model
    everything = _quantize(model, embeddings=True).model
    fp32, linear_bytes, all_bytes = size_bytes(model), size_bytes(linear_only), size_bytes(everything)
    assert fp32 - all_bytes > 2 * (fp32 - linear_bytes)  # the table is most of this model
    assert all_bytes < fp32 / 2.5  # 8-bit rows plus a float scale and offset each
    with torch.inference_mode():
        reference, quantized = model(ids), everything(ids)
    cosine = torch.nn.functional.cosine_similarity(quantized, reference, dim=1)
    assert float(cosine.min()) > 0.99
    assert float((quantized - reference).abs().max()) < 0.05 * float(reference.abs().max())


def test_measure_counts_the_quantized_table_honestly():
    model = _model()
    quantized = _quantize(model, embeddings=True).model
    tensors = dict(weight_tensors(quantized))
    assert tensors["emb.weight"].shape == (VOCAB, DIM)
    # zeros are values that are 0, not the integer 0 (each row's minimum): only the padding row
    assert int((tensors["emb.weight"] == 0).sum()) == DIM
    assert count_params(quantized)[0] == count_params(model)[0]


def test_deep_copy_and_pickle_keep_the_outputs():
    quantized, ids = _quantize(_model(), embeddings=True).model, _ids()
    with torch.inference_mode():
        expected = quantized(ids)
        copied = copy.deepcopy(quantized)(ids)
        unpickled = pickle.loads(pickle.dumps(quantized))(ids)
    assert torch.equal(copied, expected) and torch.equal(unpickled, expected)
    assert isinstance(pickle.loads(pickle.dumps(quantized)).emb, _quantized_embedding())


def test_strided_indices_are_looked_up_too():
    # torch.ao's kernel refuses non-contiguous indices; a BERT's default token_type_ids are
    # an expanded buffer
    quantized = _quantize(_model(), embeddings=True).model
    row = torch.arange(1, 13).unsqueeze(0)
    strided = row.expand(4, 12)
    assert not strided.is_contiguous()
    with torch.inference_mode():
        assert torch.equal(quantized.emb(strided), quantized.emb(strided.contiguous()))
        assert torch.equal(quantized(strided), quantized(strided.contiguous()))


def test_default_leaves_the_embedding_float():
    model = _model()
    result = _quantize(model)
    assert type(result.model.emb) is nn.Embedding
    assert torch.equal(result.model.emb.weight, model.emb.weight)
    assert result.metrics["quantized_layers"] == 2
    assert result.notes == ["int8 weights in 2 Linear layers"]


def test_exclude_keeps_an_embedding_float():
    result = _quantize(_model(), embeddings=True, exclude=["emb"])
    assert type(result.model.emb) is nn.Embedding
    assert result.notes[0].startswith("int8 weights in 2 Linear layers and 0 Embedding layers")


def test_max_norm_is_refused_not_dropped():
    with pytest.raises(ConfigError, match="max_norm"):
        _quantize(_model(max_norm=1.0), embeddings=True)
    # kept fp32 by exclude, it is fine
    result = _quantize(_model(max_norm=1.0), embeddings=True, exclude=["emb"])
    assert type(result.model.emb) is nn.Embedding


def test_a_bert_quantizes_its_three_embeddings():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    bert = transformers.BertModel(config).eval()
    result = _quantize(bert, embeddings=True)
    tables = [n for n, m in result.model.named_modules() if isinstance(m, _quantized_embedding())]
    assert sorted(tables) == ["embeddings.position_embeddings", "embeddings.token_type_embeddings",
                              "embeddings.word_embeddings"]
    assert result.notes[0].startswith("int8 weights in 13 Linear layers and 3 Embedding layers")
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        reference = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        quantized = result.model(input_ids=ids, attention_mask=mask).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1)
    assert float(cosine.min()) > 0.95


def test_per_channel_scales_each_row_and_keeps_rows_of_small_weights():
    model = _model()
    with torch.no_grad():  # rows 100x apart: one scale a layer rounds the small ones away
        model.hidden.weight[:8] *= 100
    ids = _ids()
    with torch.inference_mode():
        expected = model.hidden(model.emb(ids).mean(dim=1))
        errors = {}
        for per_channel in (False, True):
            result = _quantize(model, per_channel=per_channel)
            layer = result.model.hidden
            assert layer.weight().qscheme() == (torch.per_channel_affine if per_channel
                                                else torch.per_tensor_affine)
            got = layer(model.emb(ids).mean(dim=1))
            errors[per_channel] = float((got - expected)[:, 8:].abs().max())
    assert "(per channel)" in result.notes[0]
    assert errors[True] < errors[False] / 5
