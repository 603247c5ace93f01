"""in_batches: the batches a DataLoader gives, in the same order, fetched whole."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from compressflow_data.batching import in_batches


def test_whole_batches_equal_a_dataloaders_and_other_datasets_keep_one():
    data = TensorDataset(torch.randn(2503, 7), torch.arange(2503))
    ours, theirs = list(in_batches(data, 1000)), list(DataLoader(data, batch_size=1000))
    assert [len(b[1]) for b in ours] == [1000, 1000, 503]
    assert all(torch.equal(a, b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    listed = [(torch.zeros(2), 1)] * 3  # not a TensorDataset: the plain loader, as before
    assert in_batches(listed, 2).batch_size == 2
