"""Deterministic minibatch order and collation for a stage's data."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def dataset_length(data: Any) -> int:
    if isinstance(data, (tuple, list)):
        lengths = {len(t) for t in data}
        if len(lengths) != 1:
            raise ValueError(f"tensors in a data tuple must share their first dimension, got lengths {sorted(lengths)}")
        return lengths.pop()
    return len(data)


def minibatch_indices(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of every minibatch, ``[steps, batch_size]``.

    Shuffled epochs are concatenated into one stream that is cut into equal
    batches, so the order depends on ``seed`` alone and a batch may straddle
    two epochs.
    """
    if n < 1:
        raise ValueError("a stage's data is empty")
    generator = torch.Generator().manual_seed(int(seed))
    needed = steps * batch_size
    epochs = -(-needed // n)
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return stream[:needed].view(steps, batch_size)


def collate(data: Any, indices: Sequence[int] | torch.Tensor) -> Any:
    """The batch of ``data`` at ``indices``; tensors are indexed directly (a contiguous range is a view)."""
    if isinstance(indices, range) and indices.step == 1 and isinstance(data, (tuple, list, TensorDataset)):
        tensors = data.tensors if isinstance(data, TensorDataset) else data
        return tuple(t[indices.start:indices.stop] for t in tensors)
    index = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, (tuple, list)):
        return tuple(t[index] for t in data)
    if isinstance(data, TensorDataset):
        return tuple(t[index] for t in data.tensors)
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return default_collate([data[int(i)] for i in index])
    raise TypeError(f"stage data must be a torch Dataset or a tuple of tensors, got {type(data).__name__}")
