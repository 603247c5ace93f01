"""in_batches: the batches a DataLoader gives, in the same order, fetched whole;
LengthGroupedBatches: every sample once an epoch, in batches of like lengths, seeded."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from compressflow_data.batching import LengthGroupedBatches, in_batches


def test_whole_batches_equal_a_dataloaders_and_other_datasets_keep_one():
    data = TensorDataset(torch.randn(2503, 7), torch.arange(2503))
    ours, theirs = list(in_batches(data, 1000)), list(DataLoader(data, batch_size=1000))
    assert [len(b[1]) for b in ours] == [1000, 1000, 503]
    assert all(torch.equal(a, b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    listed = [(torch.zeros(2), 1)] * 3  # not a TensorDataset: the plain loader, as before
    assert in_batches(listed, 2).batch_size == 2


def test_length_grouped_batches_hold_every_sample_once_in_batches_of_like_lengths():
    lengths = [int(n) for n in torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(1))]
    batches = LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(0), mega=5)
    first, second = list(batches), list(batches)
    assert len(first) == len(batches) == 32  # ceil(1000 / 32); one short batch
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert sorted(len(b) for b in first)[1:] == [32] * 31
    assert first != second  # a new order every epoch
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(2)).tolist()
    at_random = [shuffled[k:k + 32] for k in range(0, 1000, 32)]
    assert padded(first) < 0.7 * padded(at_random)  # what grouping is for: little padding
    batches.sampler.generator.manual_seed(0)  # DataBundle.reseed: the same epochs again
    assert list(batches) == first


def test_a_loader_with_a_batch_sampler_reports_the_batch_size_and_reseeds():
    from compressflow.data import DataBundle, batch_size

    generator = torch.Generator().manual_seed(0)
    grouped = DataLoader(list(range(100)), batch_sampler=LengthGroupedBatches(
        [i % 7 for i in range(100)], 8, generator))
    plain = DataLoader(list(range(100)), batch_size=4)
    assert batch_size(grouped) == 8 and batch_size(plain) == 4
    bundle = DataBundle(train=grouped, val=plain, calibration=plain)
    bundle.reseed(3)
    first = [b.tolist() for b in grouped]
    bundle.reseed(3)
    assert [b.tolist() for b in grouped] == first
