"""Ready-made behaviours: callables ``(model) -> Tensor[N]``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from torch.utils._pytree import tree_flatten

from stagecredit.recording.batches import collate, dataset_length


MAX_CHUNK = 1024  # examples per chunk where examples are small
CHUNK_ELEMENTS = 2**20  # about this many input elements per chunk where they are large


def evaluation_chunk(data: Any) -> int:
    """Examples per chunk for evaluating ``data``: ``CHUNK_ELEMENTS`` input elements' worth, 16 to ``MAX_CHUNK``.

    A model whose activations are large per example (a transformer's
    ``[seq, hidden]`` states and ``[heads, seq, seq]`` attention) runs faster
    in small chunks, most of all through the forward-mode JVP of linear mode,
    which doubles every activation: on the text demo's attention layer (64 ×
    384 inputs per review) one JVP over 800 reviews took 9.68 s in chunks of
    1024 and 3.40 s in chunks of 32 (1.57 s and 1.07 s without the JVP). Small
    examples (MNIST's 784 pixels) keep chunks of 1024, where fewer calls are faster.
    """
    n = dataset_length(data)
    if n == 0:
        return MAX_CHUNK
    leaves, _ = tree_flatten(collate(data, [0]))
    per_example = sum(t.numel() for t in leaves if isinstance(t, torch.Tensor)) or 1
    return max(16, min(MAX_CHUNK, CHUNK_ELEMENTS // per_example))


def cross_entropy_per_example(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy per example for a batch ``(*inputs, labels)``: the model gets every tensor but the last."""
    return F.cross_entropy(model(*batch[:-1]), batch[-1], reduction="none")


class PerExampleLoss:
    """The loss of every example of an evaluation set, ``[N]`` (loss-like: larger is worse).

    ``loss_fn(model, batch)`` must return one loss per example (``[B]``); the
    default is cross-entropy on ``(inputs, targets)`` batches. The set is
    evaluated in chunks of ``batch_size`` so memory does not grow with ``N``
    (default: :func:`evaluation_chunk`, 1024 examples unless they are large).
    """

    kind = "loss"

    def __init__(self, data: Any, loss_fn: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None,
                 *, batch_size: Optional[int] = None, name: str = "per-example loss") -> None:
        self.data = data
        self.loss_fn = loss_fn or cross_entropy_per_example
        self.batch_size = batch_size or evaluation_chunk(data)
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

    def __init__(self, data: Any, *, batch_size: Optional[int] = None, name: str = "per-example correctness") -> None:
        self.data = data
        self.batch_size = batch_size or evaluation_chunk(data)
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
