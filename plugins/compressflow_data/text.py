"""The ``text`` dataset: lines of the user's text files tokenized by the model's own
tokenizer (embedding, causal-lm), or, for causal-lm, strided windows over one token stream.

This module imports neither numpy nor torch at import time (validation stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, model_validator

from compressflow import ConfigError, DataBundle, DataInfo, DataPath, Dataset, DatasetParams
from compressflow.data import DataContext, file_digest
from compressflow.fingerprint import files_digest
from compressflow_data.files import keep_fraction, loaders, require_file


class TextParams(DatasetParams):
    """Lines of text, tokenized by the model's tokenizer."""

    paths: list[DataPath] = Field(min_length=1, description="training text files, one sample per line")
    eval_paths: list[DataPath] = Field(
        min_length=1, description="held-out text files: the evaluated split (never training lines)")
    max_length: PositiveInt = Field(128, description="tokens per line at most (longer lines are cut)")
    window: int | None = Field(
        None, ge=2, description="causal-lm: windows of this many tokens over all the split's tokens")
    stride: PositiveInt | None = Field(
        None, description="causal-lm: a window starts every stride tokens (default: window)")
    eval_tokens: PositiveInt | None = Field(
        None, description="causal-lm: score the first N tokens of the eval files only "
        "(default: all of them)")
    encoding: str = Field("utf-8", description="the files' text encoding")
    group_by_length: bool = Field(
        False, description="training batches of lines of similar length (less padding, "
        "faster epochs), still shuffled by the seed; lines only, not windows; one process "
        "(distributed ranks draw shuffled shares of their own)")

    @model_validator(mode="after")
    def _stride_fits_window(self):
        if self.stride is not None and self.window is None:
            raise ValueError("stride needs window: set window (tokens per window) too")
        if self.window is not None and self.group_by_length:
            raise ValueError("group_by_length is for lines: windows are all the same length")
        if self.window is not None:
            self.stride = self.stride or self.window
            if self.stride > self.window:
                raise ValueError(f"stride {self.stride} is longer than window {self.window}: "
                                 "tokens between windows would be skipped")
        elif self.eval_tokens is not None:
            raise ValueError("eval_tokens needs window: set window (tokens per window) too")
        return self


def read_lines(paths: list[Path], encoding: str, ctx: DataContext, key: str) -> list[str]:
    """The non-blank lines of ``paths``, in order, without their line ends."""
    lines = []
    for path in paths:
        try:
            text = path.read_text(encoding=encoding)
        except UnicodeDecodeError as error:
            raise ConfigError(f"{ctx.place}: data.args.{key}: {path} is not {encoding} text: {error}",
                              "set data.args.encoding to the files' encoding") from None
        lines += [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{ctx.place}: data.args.{key}: {', '.join(map(str, paths))} hold no text",
                          "one sample per line; blank lines are skipped")
    return lines


class Tokenize:
    """A collate_fn: a batch of lines to the tokenizer's tensors, padded to the batch's
    longest line (at most ``max_length`` tokens)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, lines: list[str]) -> dict:
        encoded = self.tokenizer(list(lines), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        return dict(encoded)

    def lengths(self, lines: list[str]) -> list[int]:
        """Each line's token count as a batch holds it (cut at ``max_length``)."""
        ids = self.tokenizer(list(lines), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(row) for row in ids]


class Windows:
    """Equal windows of one token stream as a map-style dataset of dicts (``input_ids``,
    ``attention_mask``, ``labels``), which the default collate stacks."""

    def __init__(self, input_ids, labels) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


def stream_windows(tokens: list[int], window: int, stride: int):
    """``(input_ids, labels)`` (M, L) of windows of ``window`` tokens starting every
    ``stride`` tokens; the last one ends at the stream's end. Labels are the tokens, with
    -100 on those a window shares with the one before (already scored there), so that every
    token is scored exactly once. A stream shorter than ``window`` is one window."""
    import torch

    ids = torch.tensor(tokens, dtype=torch.long)
    total = len(ids)
    if total <= window:
        return ids[None].clone(), ids[None].clone()
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] + window < total:
        starts.append(total - window)  # the tail, as the context before it allows
    inputs = torch.stack([ids[s:s + window] for s in starts])
    labels = inputs.clone()
    scored_until = window
    for row, start in enumerate(starts[1:], start=1):
        labels[row, : scored_until - start] = -100
        scored_until = start + window
    return inputs, labels


def token_stream(tokenizer: Any, lines: list[str]) -> list[int]:
    """Every line's tokens in order, one stream; a tokenizer with an end-of-sequence token
    gets it after each line that does not already end with it (lines stay apart)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for start in range(0, len(lines), 1000):
        for ids in tokenizer(lines[start:start + 1000])["input_ids"]:
            ids = [int(i) for i in ids]
            stream += ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
    return stream


class Text(Dataset):
    """Lines of text for the model's own tokenizer: each line a sample, batches padded to
    their longest line; for causal-lm with ``window``, strided windows over all the tokens."""

    Params = TextParams
    tasks = ("embedding", "causal-lm")

    def check(self, params: TextParams, ctx: DataContext) -> None:
        for key in ("paths", "eval_paths"):
            for path in getattr(params, key):
                require_file(path, ctx, key, "a text file, one sample per line")
        if params.window is not None and ctx.task != "causal-lm":
            raise ConfigError(f"{ctx.place}: data.args.window is for task causal-lm, not '{ctx.task}'",
                              "remove window/stride: each line is then one sample")

    def digest(self, params: TextParams, ctx: DataContext) -> str | None:
        """A sha256 of every file's bytes, ``paths`` then ``eval_paths``; which list a file is
        in the params say (moving one changes the data spec)."""
        return files_digest([*params.paths, *params.eval_paths])

    def load(self, params: TextParams, ctx: DataContext) -> DataBundle:
        import torch

        self.check(params, ctx)
        tokenizer = ctx.tokenizer
        if tokenizer is None:
            raise ConfigError(f"{ctx.place}: dataset text needs the model's tokenizer, and the "
                              "input model carries none",
                              "the model needs a `.tokenizer` (a Hugging Face tokenizer, set by "
                              "the model's factory), which text is tokenized with")
        train_lines = read_lines(params.paths, params.encoding, ctx, "paths")
        eval_lines = read_lines(params.eval_paths, params.encoding, ctx, "eval_paths")
        files = [*params.paths, *params.eval_paths]
        info = DataInfo(name=f"text:{params.paths[0].stem}", digest=file_digest(files),
                        source=", ".join(map(str, params.paths)) + " | eval: "
                        + ", ".join(map(str, params.eval_paths)))
        if params.window is not None:
            train = Windows(*stream_windows(token_stream(tokenizer, train_lines),
                                            params.window, params.stride))
            scored = token_stream(tokenizer, eval_lines)[: params.eval_tokens]
            val = Windows(*stream_windows(scored, params.window, params.stride))
            kept = keep_fraction(len(train), ctx)
            if len(kept) < len(train):
                train = Windows(train.input_ids[torch.as_tensor(kept)], train.labels[torch.as_tensor(kept)])
            return loaders(train, val, ctx, val_batch=ctx.spec.batch_size, info=info)
        if getattr(tokenizer, "pad_token", True) is None:
            raise ConfigError(f"{ctx.place}: the model's tokenizer has no padding token, and "
                              "lines of different lengths are padded per batch",
                              "set the tokenizer's pad_token in the model's factory (for a causal "
                              "LM often its eos_token), or, for causal-lm, use window/stride")
        kept = keep_fraction(len(train_lines), ctx)
        train_lines = [train_lines[i] for i in kept]
        collate = Tokenize(tokenizer, params.max_length)
        lengths = collate.lengths(train_lines) if params.group_by_length else None
        return loaders(train_lines, eval_lines, ctx, val_batch=ctx.spec.batch_size,
                       collate=collate, lengths=lengths, info=info)
