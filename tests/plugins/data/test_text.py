"""compressflow_data.text: the text dataset from the user's files, lines and causal-lm
windows.

Every file is written here, small; pipelines run through the CLI into one sqlite store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressflow import ConfigError
from compressflow_data.text import Text, stream_windows
from tests.plugins.data.conftest import final_runs, load, pipeline, write_lines


# --- text: a real (tiny) tokenizer, no download ------------------------------------------


class WhitespaceTokenizer:
    """A word-level tokenizer with the Hugging Face call signature: ids from a vocabulary
    (0 pad, 1 unknown), padded to the longest text with return_tensors="pt"."""

    pad_token, pad_token_id = "<pad>", 0

    def __init__(self, words: list[str], eos: str | None = None) -> None:
        self.vocab = {"<pad>": 0, "<unk>": 1}
        for word in [*words, *([eos] if eos else [])]:
            self.vocab.setdefault(word, len(self.vocab))
        self.eos_token_id = self.vocab[eos] if eos else None

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None):
        ids = [[self.vocab.get(word, 1) for word in text.split()] for text in texts]
        if truncation and max_length:
            ids = [row[:max_length] for row in ids]
        masks = [[1] * len(row) for row in ids]
        if return_tensors != "pt":
            return {"input_ids": ids, "attention_mask": masks}
        longest = max(map(len, ids))
        if not padding and len({len(row) for row in ids}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        pad = lambda rows: torch.tensor([row + [0] * (longest - len(row)) for row in rows])
        return {"input_ids": pad(ids), "attention_mask": pad(masks)}


class TinyLM(nn.Module):
    """Embedding -> Linear over the vocabulary: logits (B, T, V)."""

    def __init__(self, tokenizer: WhitespaceTokenizer, width: int = 8) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(len(tokenizer.vocab), width)
        self.head = nn.Linear(width, len(tokenizer.vocab))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def tiny_lm(words: list[str], eos: str | None = "<eos>") -> TinyLM:
    """A factory for ``import:`` sources."""
    torch.manual_seed(0)
    return TinyLM(WhitespaceTokenizer(words, eos))


class TinyEncoder(TinyLM):
    """Mean of the attended tokens' embeddings, projected: one vector a line."""

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


def tiny_encoder(words: list[str]) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(WhitespaceTokenizer(words))


WORDS = "a b c d e f g h i j".split()


def test_text_lines_are_batched_padded_per_batch_and_eval_comes_from_eval_paths(tmp_path):
    write_lines(tmp_path / "train.txt", ["a", "", "a b c", "a b", "   ", "a b c d e f g"])
    write_lines(tmp_path / "more.txt", ["j i"])
    write_lines(tmp_path / "eval.txt", ["h", "h i j", "g h"])
    model = tiny_lm(WORDS, eos=None)
    args = {"paths": ["train.txt", "more.txt"], "eval_paths": ["eval.txt"], "max_length": 5}
    bundle = load("text", args, tmp_path, task="embedding", model=model, batch_size=2,
                  calibration_batches=1)
    vocab = model.tokenizer.vocab
    seen, order = [], []
    for batch in bundle.train:
        order.append(batch["input_ids"][:, 0].tolist())
        assert set(batch) == {"input_ids", "attention_mask"}
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # the batch's longest, no more
        assert int(lengths.max()) <= 5  # max_length truncates
        seen += [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], lengths)]
    assert sorted(seen) == sorted([(vocab["a"],), tuple(vocab[w] for w in "abc"),
                                   (vocab["a"], vocab["b"]), tuple(vocab[w] for w in "abcde"),
                                   (vocab["j"], vocab["i"])])  # blank lines skipped
    again = load("text", args, tmp_path, task="embedding", model=model, batch_size=2,
                 calibration_batches=1)
    assert order == [b["input_ids"][:, 0].tolist() for b in again.train]  # seeded shuffle
    val = list(bundle.val)
    assert [b["input_ids"].tolist() for b in val] == [
        [[vocab["h"], 0, 0], [vocab["h"], vocab["i"], vocab["j"]]], [[vocab["g"], vocab["h"]]]]
    assert val[0]["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert bundle.info.splits == {"train": 5, "eval": 3, "calibration": 2}
    assert bundle.num_classes is None and bundle.sample_shape is None


def test_group_by_length_batches_lines_of_like_length_every_line_once(tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=n)) for n in rng.integers(1, 40, size=300)]
    write_lines(tmp_path / "train.txt", lines)
    write_lines(tmp_path / "eval.txt", ["h i"])
    args = {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "max_length": 30,
            "group_by_length": True}
    model = tiny_lm(WORDS, eos=None)
    grouped = load("text", args, tmp_path, task="embedding", model=model, batch_size=8)
    plain = load("text", {**args, "group_by_length": False}, tmp_path, task="embedding",
                 model=model, batch_size=8)
    positions = lambda loader: sum(b["input_ids"].numel() for b in loader)
    tokens = sum(min(len(line.split()), 30) for line in lines)
    assert positions(grouped.train) < 1.2 * tokens < positions(plain.train)
    seen = sorted(tuple(row[:n].tolist()) for b in grouped.train
                  for row, n in zip(b["input_ids"], b["attention_mask"].sum(1)))
    assert seen == sorted(tuple(row[:n].tolist()) for b in plain.train
                          for row, n in zip(b["input_ids"], b["attention_mask"].sum(1)))
    grouped.reseed(0)
    first = [b["input_ids"].tolist() for b in grouped.train]
    grouped.reseed(0)
    assert [b["input_ids"].tolist() for b in grouped.train] == first  # seeded
    assert len(grouped.calibration) == len(plain.calibration)  # calibration as before


def test_causal_lm_windows_and_labels_exactly(tmp_path):
    # one stream: a b c <eos> d e f g <eos> (9 tokens); window 4, stride 3:
    # windows start at 0, 3 and (the tail) 5
    write_lines(tmp_path / "train.txt", ["a b c", "", "d e f g"])
    write_lines(tmp_path / "eval.txt", ["h i j", "a"])
    model = tiny_lm(WORDS)
    bundle = load("text", {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "window": 4,
                           "stride": 3}, tmp_path, task="causal-lm", model=model, batch_size=8)
    v = model.tokenizer.vocab
    a, b, c, d, e, f, g, h, i, j, eos = (v[w] for w in [*"abcdefghij", "<eos>"])
    windows = bundle.train.dataset
    assert windows.input_ids.tolist() == [[a, b, c, eos], [eos, d, e, f], [e, f, g, eos]]
    assert windows.labels.tolist() == [[a, b, c, eos], [-100, d, e, f], [-100, -100, g, eos]]
    # the task scores labels[1:] from logits[:-1]: every token after the first exactly once
    scored = [t for row in windows.labels.tolist() for t in row[1:] if t != -100]
    assert scored == [b, c, eos, d, e, f, g, eos]
    batch = next(iter(bundle.val))  # from eval.txt only: h i j <eos> a <eos> (6 tokens)
    assert batch["input_ids"].tolist() == [[h, i, j, eos], [j, eos, a, eos]]
    assert batch["labels"].tolist() == [[h, i, j, eos], [-100, -100, a, eos]]
    assert batch["attention_mask"].tolist() == [[1] * 4] * 2

    from compressflow_tasks import CausalLM

    task = CausalLM()
    inputs, labels = task.split(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and labels is batch["labels"]
    assert len(task.token_nll(task.predict(model, inputs), labels)) == 5  # 3 + 2 new tokens
    first = load("text", {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "window": 4,
                          "stride": 3, "eval_tokens": 5}, tmp_path, task="causal-lm", model=model)
    assert first.val.dataset.input_ids.tolist() == [[h, i, j, eos], [i, j, eos, a]]  # 5 tokens
    assert first.val.dataset.labels.tolist() == [[h, i, j, eos], [-100, -100, -100, a]]
    assert first.train.dataset.input_ids.tolist() == windows.input_ids.tolist()  # train as before


def test_stride_equal_to_window_and_a_short_stream():
    inputs, labels = stream_windows(list(range(10, 20)), 4, 2)
    assert inputs.tolist() == [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17], [16, 17, 18, 19]]
    assert labels.tolist() == [[10, 11, 12, 13], [-100, -100, 14, 15], [-100, -100, 16, 17],
                               [-100, -100, 18, 19]]
    inputs, labels = stream_windows(list(range(8)), 4, 4)
    assert inputs.tolist() == labels.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    inputs, labels = stream_windows([5, 6, 7], 4, 2)
    assert inputs.tolist() == labels.tolist() == [[5, 6, 7]]


def test_text_without_a_tokenizer_or_with_bad_windows_is_a_config_error(tmp_path):
    write_lines(tmp_path / "t.txt", ["a b"])
    args = {"paths": ["t.txt"], "eval_paths": ["t.txt"]}
    with pytest.raises(ConfigError, match="tokenizer") as caught:
        load("text", args, tmp_path, task="causal-lm", model=nn.Linear(2, 2))
    assert "`.tokenizer`" in caught.value.hint
    with pytest.raises(ConfigError, match="causal-lm"):
        load("text", {**args, "window": 8}, tmp_path, task="embedding", model=tiny_lm(WORDS))
    with pytest.raises(Exception, match="stride"):
        Text.Params.model_validate({**args, "window": 4, "stride": 5})
    with pytest.raises(Exception, match="group_by_length is for lines"):
        Text.Params.model_validate({**args, "window": 4, "group_by_length": True})
    with pytest.raises(Exception, match="eval_tokens needs window"):
        Text.Params.model_validate({**args, "eval_tokens": 100})
    with pytest.raises(Exception, match="eval_paths"):
        Text.Params.model_validate({"paths": ["t.txt"]})
    with pytest.raises(ConfigError, match="missing.txt"):
        load("text", {**args, "eval_paths": ["missing.txt"]}, tmp_path, task="causal-lm",
             model=tiny_lm(WORDS))


def test_causal_lm_pipeline_trains_on_windows(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    project.mkdir()
    sentence = "a b c d e f g h i j"
    write_lines(project / "train.txt", [sentence] * 30)
    write_lines(project / "eval.txt", [sentence] * 5)
    model = {"source": "import:tests.plugins.data.test_text:tiny_lm", "args": {"words": WORDS}}
    path = pipeline(project, {"dataset": "text", "batch_size": 8,
                              "args": {"paths": ["train.txt"], "eval_paths": ["eval.txt"],
                                       "window": 16, "stride": 8}},
                    model, [{"name": "baseline", "train": {"epochs": 6, "lr": 0.05}},
                            {"prune": {"sparsity": 0.3}}, {"finetune": {"epochs": 2, "lr": 0.02}}],
                    name="text-lm", task="causal-lm")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert result.exit_code == 0, result.output
    runs = final_runs(shared_store, "text-lm")
    before, after = runs["input"].data.metrics["perplexity"], runs["2-finetune"].data.metrics["perplexity"]
    assert before > 8 and after < 2, (before, after)  # a repeated sentence is learned


def test_embedding_pipeline_prunes_and_recovers_on_padded_lines(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    project.mkdir()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(60)]
    write_lines(project / "train.txt", lines[:48])
    write_lines(project / "eval.txt", lines[48:])
    model = {"source": "import:tests.plugins.data.test_text:tiny_encoder", "args": {"words": WORDS}}
    path = pipeline(project, {"dataset": "text", "batch_size": 8,
                              "args": {"paths": ["train.txt"], "eval_paths": ["eval.txt"]}},
                    model, [{"prune": {"sparsity": 0.6}}, {"finetune": {"epochs": 3, "lr": 0.01}}],
                    name="text-embedding", task="embedding")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert result.exit_code == 0, result.output
    runs = final_runs(shared_store, "text-embedding")
    assert runs["input"].data.metrics["cosine_mean"] == pytest.approx(1.0)
    pruned, recovered = (runs[n].data.metrics["cosine_mean"] for n in ("0-prune", "1-finetune"))
    assert pruned < 0.999 and recovered > pruned, (pruned, recovered)
    assert runs["0-prune"].data.metrics["sparsity"] > 0.2  # the Linear head; embeddings stay dense
