"""Ready-made behaviours: callables ``(model) -> Tensor[N]``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from stagecredit.recording.batches import collate, dataset_length


def cross_entropy_per_example(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy per example for a batch ``(*inputs, labels)``: the model gets every tensor but the last."""
    return F.cross_entropy(model(*batch[:-1]), batch[-1], reduction="none")


class PerExampleLoss:
    """The loss of every example of an evaluation set, ``[N]`` (loss-like: larger is worse).

    ``loss_fn(model, batch)`` must return one loss per example (``[B]``); the
    default is cross-entropy on ``(inputs, targets)`` batches. The set is
    evaluated in chunks of ``batch_size`` so memory does not grow with ``N``.
    """

    kind = "loss"

    def __init__(self, data: Any, loss_fn: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None,
                 *, batch_size: int = 1024, name: str = "per-example loss") -> None:
        self.data = data
        self.loss_fn = loss_fn or cross_entropy_per_example
        self.batch_size = batch_size
        self.name = name
        self.n = dataset_length(data)

    def __len__(self) -> int:
        return self.n

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        chunks = []
        for start in range(0, self.n, self.batch_size):
            batch = collate(self.data, range(start, min(start + self.batch_size, self.n)))
            losses = self.loss_fn(model, batch)
            if losses.ndim != 1:
                raise ValueError(
                    f"{self.name}: loss_fn returned shape {tuple(losses.shape)}; PerExampleLoss needs one loss per "
                    "example (e.g. reduction='none')"
                )
            chunks.append(losses)
        return torch.cat(chunks)


class GroupMean:
    """Mean of a per-example behaviour within each group: ``[G]``, in the order of ``group_names``.

    ``groups`` holds one group label (an int in ``0..G-1``) per example.
    """

    def __init__(self, behaviour: Callable[[torch.nn.Module], torch.Tensor], groups: Sequence[int] | torch.Tensor,
                 group_names: Optional[Sequence[str]] = None) -> None:
        self.behaviour = behaviour
        self.groups = torch.as_tensor(groups, dtype=torch.long)
        count = int(self.groups.max()) + 1
        self.group_names = list(group_names) if group_names is not None else [f"group {g}" for g in range(count)]
        if len(self.group_names) < count:
            raise ValueError(f"{count} groups but only {len(self.group_names)} group names")
        self.name = f"group mean of {getattr(behaviour, 'name', 'behaviour')}"
        self.kind = getattr(behaviour, "kind", "loss")
        self.higher_is_better = getattr(behaviour, "higher_is_better", False)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        values = self.behaviour(model)
        sums = torch.zeros(len(self.group_names), dtype=values.dtype).index_add(0, self.groups, values)
        counts = torch.bincount(self.groups, minlength=len(self.group_names)).to(values.dtype)
        return sums / counts


class PerExampleCorrect:
    """1.0 where the model's top class equals the label, else 0.0, ``[N]`` (higher is better).

    Batches are ``(*inputs, labels)``: the model gets every tensor but the last.
    Not differentiable: use it with ``mode="model"`` (or retraining). Its mean is accuracy.
    """

    kind = "score"
    higher_is_better = True

    def __init__(self, data: Any, *, batch_size: int = 1024, name: str = "per-example correctness") -> None:
        self.data = data
        self.batch_size = batch_size
        self.name = name
        self.n = dataset_length(data)

    def __len__(self) -> int:
        return self.n

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        chunks = []
        for start in range(0, self.n, self.batch_size):
            batch = collate(self.data, range(start, min(start + self.batch_size, self.n)))
            chunks.append((model(*batch[:-1]).argmax(dim=-1) == batch[-1]).float())
        return torch.cat(chunks)


class WorstGroup:
    """The worst group's value of a group behaviour, ``[1]``: the minimum if higher is better, else the maximum.

    E.g. ``WorstGroup(GroupMean(PerExampleCorrect(data), groups))`` is worst-group
    accuracy. A min/max is not differentiable where groups tie: use ``mode="model"``.
    """

    def __init__(self, grouped: Callable[[torch.nn.Module], torch.Tensor]) -> None:
        self.grouped = grouped
        self.higher_is_better = getattr(grouped, "higher_is_better", False)
        self.kind = getattr(grouped, "kind", "loss")
        self.name = f"worst group of {getattr(grouped, 'name', 'behaviour')}"

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        values = self.grouped(model)
        worst = values.min() if self.higher_is_better else values.max()
        return worst.reshape(1)


def group_accuracy(data: Any, groups: Sequence[int] | torch.Tensor,
                   group_names: Optional[Sequence[str]] = None) -> GroupMean:
    """Accuracy within each group, ``[G]`` (higher is better; use ``mode="model"``)."""
    behaviour = GroupMean(PerExampleCorrect(data), groups, group_names)
    behaviour.name = "accuracy per group"
    return behaviour


def worst_group_accuracy(data: Any, groups: Sequence[int] | torch.Tensor) -> WorstGroup:
    """The lowest accuracy over the groups, ``[1]`` (higher is better; use ``mode="model"``)."""
    behaviour = WorstGroup(group_accuracy(data, groups))
    behaviour.name = "worst-group accuracy"
    return behaviour


def group_loss(data: Any, groups: Sequence[int] | torch.Tensor, loss_fn=None,
               group_names: Optional[Sequence[str]] = None) -> GroupMean:
    """Mean loss within each group, ``[G]`` (loss-like; differentiable, any mode)."""
    behaviour = GroupMean(PerExampleLoss(data, loss_fn), groups, group_names)
    behaviour.name = "mean loss per group"
    return behaviour
