"""The tiny random BERT (4 heads of 8, hidden 32, intermediate 64) that structured_prune/heads
and its refit are tested on, and helpers to batch and embed lines with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressflow import SourceContext
from tests.plugins.hf.conftest import EVAL_LINES, sentence_modules, tokenizer

torch = pytest.importorskip("torch")

HEADS, HEAD_SIZE, HIDDEN, FFN = 4, 8, 32, 64


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # nothing here may reach the Hub, sentence-transformers' loads included
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random BERT with 4 heads a layer, saved as a sentence-transformers folder."""
    from transformers import BertConfig, BertModel

    where = tmp_path_factory.mktemp("bert4")
    tok = tokenizer(where)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=HEADS, intermediate_size=FFN,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(where)
    tok.save_pretrained(where)
    sentence_modules(where, {"pooling_mode_mean_tokens": True}, True)
    return where


def load(folder: Path):
    from compressflow_hf import HFSource

    return HFSource().load(str(folder), {}, SourceContext(base_dir=folder, place="test"))


@pytest.fixture
def encoder(folder):
    return load(folder)


@pytest.fixture(scope="module")
def task():
    from compressflow.plugins import load_plugins

    return load_plugins().tasks.get("embedding")()


def batch(model, lines=EVAL_LINES) -> dict:
    return dict(model.tokenizer(lines, padding=True, return_tensors="pt"))


def embed(model, lines=EVAL_LINES):
    with torch.no_grad():
        return model.eval()(**batch(model, lines))
