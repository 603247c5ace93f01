"""The task contract's helpers: any input form is split, fed, joined and cut the same way."""

from __future__ import annotations

import torch
from torch import nn

from compressflow.task import Task, batch_len, call, call_args, concat, take, to_numpy


class _Two(nn.Module):
    def forward(self, a, b=None):
        return a + (0 if b is None else b)


def test_call_feeds_a_tensor_a_tuple_and_a_dict():
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(call(_Two(), a), a)
    assert torch.equal(call(_Two(), (a, b)), a + b)
    assert torch.equal(call(_Two(), {"a": a, "b": b}), a + b)
    assert call_args({"a": a}) == ((), {"a": a}) and call_args(a)[0][0] is a


def test_split_reads_pairs_and_hugging_face_dicts():
    task = Task()
    x, y = torch.zeros(2, 3), torch.tensor([1, 0])
    assert task.split((x, y)) == (x, y)
    inputs, targets = task.split({"input_ids": x, "labels": y})
    assert set(inputs) == {"input_ids"} and targets is y
    assert task.split(x) == (x, None)


def test_concat_pads_token_batches_and_take_cuts_any_form():
    first = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    second = {"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5)}
    joined = concat([first, second])
    assert joined["input_ids"].shape == (3, 5) and joined["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch_len(joined) == 3 and batch_len(take(joined, 1, 3)) == 2


def test_examples_repeat_real_inputs_and_fit_the_sequence_length():
    batches = [{"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": torch.ones(2, 3)}]
    example = Task().examples(batches, 5, seq_len=4)
    assert example["input_ids"].shape == (5, 4)
    assert example["input_ids"][0].tolist() == [0, 1, 2, 0]  # tiled, not invented
    assert Task().examples([(torch.randn(3, 8), None)], 7).shape == (7, 8)


def test_prediction_takes_logits_or_the_first_tensor():
    task = Task()
    logits = torch.randn(2, 3)
    assert task.prediction({"logits": logits, "hidden": torch.zeros(1)}) is logits
    assert task.prediction((logits, torch.zeros(1))) is logits
    assert set(to_numpy({"logits": logits})) == {"logits"}
