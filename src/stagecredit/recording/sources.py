"""A stage's data as a mixture of named sources, and the weighted loss that lets one be removed."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.utils.data import ConcatDataset, TensorDataset

from stagecredit.recording.batches import dataset_length


def _tensors(data: Any) -> Optional[tuple[torch.Tensor, ...]]:
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    return None


@dataclasses.dataclass
class DataSources:
    """Named parts of one stage's data, laid end to end in ``union`` (in the order given)."""

    names: list[str]
    parts: list[Any]
    sizes: list[int]
    weights: list[float]
    union: Any
    source_ids: torch.Tensor  # [N] long: the source of every example of ``union``

    @classmethod
    def of(cls, stage: str, data: dict[str, Any], weights: Optional[dict[str, float]] = None) -> "DataSources":
        if not data:
            raise ValueError(f"stage {stage!r}: data given as sources needs at least one source")
        names = list(data)
        for name in names:
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"stage {stage!r}: source names must be non-empty strings without '/', got {name!r}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"stage {stage!r}: source_weights names unknown sources {unknown}; sources are {names}")
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"stage {stage!r}: source weights must be >= 0, got {weights}")
        parts = [data[n] for n in names]
        sizes = [dataset_length(p) for p in parts]
        empty = [n for n, size in zip(names, sizes) if size == 0]
        if empty:
            raise ValueError(f"stage {stage!r}: sources {empty} are empty")
        tensors = [_tensors(p) for p in parts]
        if all(t is not None for t in tensors) and len({len(t) for t in tensors}) == 1:
            try:
                union: Any = tuple(torch.cat(columns) for columns in zip(*tensors))
            except RuntimeError as exc:
                raise ValueError(f"stage {stage!r}: sources' tensors do not stack ({exc})") from exc
        else:
            union = ConcatDataset([TensorDataset(*t) if t is not None else p for t, p in zip(tensors, parts)])
        ids = torch.cat([torch.full((size,), j, dtype=torch.long) for j, size in enumerate(sizes)])
        return cls(names, parts, sizes, [float(weights.get(n, 1.0)) for n in names], union, ids)

    def weights_with(self, override: Optional[dict[str, float]]) -> list[float]:
        """The source weights with some replaced (e.g. ``{"web": 0.0}`` removes the web source)."""
        if not override:
            return list(self.weights)
        unknown = sorted(set(override) - set(self.names))
        if unknown:
            raise ValueError(f"unknown sources {unknown}; this stage's sources are {self.names}")
        return [float(override.get(n, w)) for n, w in zip(self.names, self.weights)]
