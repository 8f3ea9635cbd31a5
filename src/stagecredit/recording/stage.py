"""What a user declares: the stages of a training pipeline."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import torch

from stagecredit.recording.sources import DataSources
from stagecredit.seeding import seeded

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclasses.dataclass
class Stage:
    """One training stage: its data, loss, optimizer, schedule, length and seed.

    ``data`` is a ``torch.utils.data.Dataset`` or a tuple of tensors sharing the
    first dimension (e.g. ``(X, y)``). ``loss_fn(model, batch)`` returns the
    scalar training loss (a per-example vector is averaged).

    ``data`` may also be a mixture of named sources, ``{"web": ds1, "curated": ds2}``.
    Minibatches are then drawn from their union, ``loss_fn`` must return one
    loss per example, and a step's loss is ``Σ_j w_j Σ_{i∈batch∩j} ℓ_i / B``
    with ``source_weights`` ``w_j`` (default 1). Removing source j means
    ``w_j = 0``: the same minibatches, its examples contributing nothing. The
    run records, per source, what removing it does to the state at the end of
    the stage, so ``sc.attribute_sources`` can score each source.

    ``carry_optimizer_state``: start this stage's optimizer with the
    per-parameter state (momentum buffers, Adam moments) of the optimizer that
    ran just before it, instead of a fresh one. Hyper-parameters still come
    from this stage's ``optimizer`` factory.

    ``max_grad_norm``: before every step, clip the gradient's total L2 norm
    over the model's parameters to this (``torch.nn.utils.clip_grad_norm_``,
    as Hugging Face's ``Trainer`` does with its default ``max_grad_norm=1.0``).
    Each step's unclipped norm is recorded. ``aa`` is unaffected by clipping
    (it holds the later gradients fixed); ``aa-curvature`` clips the
    counterfactual gradient the same way (docs/concepts.md).
    """

    name: str
    data: Any
    loss_fn: LossFn
    optimizer: OptimizerFactory
    steps: int
    batch_size: int
    seed: int = 0
    scheduler: Optional[SchedulerFactory] = None
    carry_optimizer_state: bool = False
    source_weights: Optional[dict[str, float]] = None
    max_grad_norm: Optional[float] = None
    sources: Optional[DataSources] = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name must be non-empty and contain no '/': {self.name!r}")
        if isinstance(self.data, dict):
            self.sources = DataSources.of(self.name, self.data, self.source_weights)
            self.data = self.sources.union
        elif self.source_weights is not None:
            raise ValueError(f"stage {self.name!r}: source_weights needs data given as named sources (a dict)")
        if self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"stage {self.name!r}: batch_size must be >= 1, got {self.batch_size}")
        check_max_grad_norm(self.name, self.max_grad_norm)


def check_max_grad_norm(name: str, max_grad_norm: Optional[float]) -> None:
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"stage {name!r}: max_grad_norm must be a positive number or None, got {max_grad_norm!r}")


@dataclasses.dataclass
class PretrainedStage:
    """A first stage that arrives from outside: weights someone else trained (e.g. a hub checkpoint).

    ``weights`` is a state dict, or a callable returning one (loaded when the
    run is recorded). Its ``Δ = θ_pretrained − θ_init``, where ``θ_init`` is the
    pipeline's ``model_fn()`` under ``torch.manual_seed(pipeline.seed)``, recorded
    as the run's initialisation. Skipping it means the later stages start from
    that fresh initialisation instead of the pretrained weights.
    """

    name: str
    weights: Any
    steps: int = dataclasses.field(default=0, init=False)
    batch_size: None = dataclasses.field(default=None, init=False)
    seed: None = dataclasses.field(default=None, init=False)
    carry_optimizer_state: bool = dataclasses.field(default=False, init=False)
    max_grad_norm: None = dataclasses.field(default=None, init=False)
    external: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name must be non-empty and contain no '/': {self.name!r}")

    def load(self) -> dict:
        return self.weights() if callable(self.weights) else self.weights


@dataclasses.dataclass
class Pipeline:
    """A model factory and the stages that train it, in order.

    ``model_fn`` must build the same initial model every time it is called
    after ``torch.manual_seed(seed)``.

    ``checkpoint_every``: also save parameters and optimizer state every this
    many steps inside each stage (0: only at stage ends). The ``aa-curvature``
    estimator evaluates curvature at these checkpoints; ``delta`` and ``aa``
    do not need them.
    """

    model_fn: Callable[[], torch.nn.Module]
    stages: list[Any]  # Stage, or a PretrainedStage first
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a Pipeline needs at least one Stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if any(isinstance(s, PretrainedStage) for s in self.stages[1:]):
            raise ValueError("a PretrainedStage can only be the first stage")
        if len(self.stages) > 1 and isinstance(self.stages[0], PretrainedStage) and self.stages[1].carry_optimizer_state:
            raise ValueError(f"stage {self.stages[1].name!r} cannot carry optimizer state from a pretrained stage")
        if self.stages[0].carry_optimizer_state:
            raise ValueError(f"stage {names[0]!r} is the first stage: there is no optimizer state to carry")

    def build_model(self) -> torch.nn.Module:
        with seeded(self.seed):
            return self.model_fn()

    def run(self, path, *, progress: bool = True, overwrite: bool = False, resume: bool = False):
        """Train every stage in order, recording the run under ``path``; return a ``Run``.

        ``resume=True``: continue a recording that was interrupted, after the
        last stage it finished (the result is bit-identical to an uninterrupted
        recording); with nothing to resume it records from the start. The
        pipeline must be the one that began it (checked: its stages and its
        initialisation). ``overwrite=True``: replace a finished run there.
        """
        from stagecredit.recording.training import record_pipeline

        return record_pipeline(self, path, progress=progress, overwrite=overwrite, resume=resume)
