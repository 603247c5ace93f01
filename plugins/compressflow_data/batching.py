"""Loaders that fetch a whole batch of in-memory tensors at once.

A DataLoader over a TensorDataset asks for one sample at a time and stacks them again: for
MNIST's 10,000 test images that is most of an evaluation's time (0.06 s of 0.1 s, against
0.04 s for the model itself). Indexing the tensors with the batch's indices gives the same
batches, in the same order, in one call.
"""

from __future__ import annotations

from typing import Any


def in_batches(dataset: Any, batch_size: int, collate_fn: Any = None) -> Any:
    """A loader of ``dataset`` in order, ``batch_size`` samples a batch (the last one
    shorter): whole batches fetched by index from a TensorDataset, else a plain DataLoader."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

    if not isinstance(dataset, TensorDataset) or collate_fn is not None:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    # batch_size=None: each item the sampler gives is one batch's indices, fetched at once
    return DataLoader(dataset, sampler=batches, batch_size=None)
