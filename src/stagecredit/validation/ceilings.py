"""How well can any estimate agree with retraining? The ground truth's own reproducibility and linearity.

The same two measurements apply to data sources (``sources=True``): the partial
removal keeps the source at weight ``1 − ε``, and the nudged retraining removes
it from a nudged start of its stage.

Retraining without stage k is the ground truth, but it is one outcome of a
training run, and training can be sensitive to where it starts. Two extra
retrainings per stage say how much of it an estimator can be expected to match:

* **reproducibility** — retrain without stage k once more, from ``θ^(k−1)``
  plus a random nudge of ``nudge · ‖Δ_k‖`` (1% by default), and correlate the
  two sets of effects. Where training amplifies small differences (large
  learning rates, noisy data), the two disagree: the outcome hinges on details
  a 1% change of the question redraws. Under the model that the truth is
  ``signal + noise`` with independent noise of the same size in both
  retrainings, the best an estimator of the signal can reach is
  ``√reproducibility``: the **ceiling** (a guide, not a proof: the truth is
  deterministic given the record, and retraining itself scores 1).
* **linearity** — retrain after removing only a fraction ``ε`` of stage k
  (resume from ``θ^(k) − ε Δ_k``), divide the effect by ``ε``, and correlate it
  with the full removal. The scaled partial removal is what the first-order
  estimators (``aa``, ``aa-curvature``) approximate; this is what a perfect
  estimate of it would score against the full removal (not a bound: an
  estimator may land closer to the full removal by chance). Step counters in
  carried optimizer state stay as recorded, so with Adam state the partial
  removal moves the moments, not the bias correction.

``derivative`` holds the scaled partial-removal effects as an
:class:`Attribution` (``method="retrain-derivative"``) so estimators can be
scored against the quantity they approximate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from stagecredit.estimators.attribute import Attribution
from stagecredit.estimators.embedding import stage_delta
from stagecredit.estimators.optimizers import carried_state_source, counterfactual_state_source
from stagecredit.progress import progress_bar
from stagecredit.storage.run import Run
from stagecredit.validation.metrics import pearson
from stagecredit.validation.retrain import (
    _retrained_attribution,
    removal_start,
    replay,
    resume_after,
    retrain_effects,
    retrain_source_effects,
    source_removal_start,
    without_source_model,
)

DERIVATIVE = "retrain-derivative"
REPRODUCIBLE = 0.95  # reproducibility from which retraining counts as a stable target
LINEAR = 0.9  # linearity from which a first-order estimate can match the full removal


@dataclasses.dataclass
class TruthCeilings:
    """Per stage: how reproducible and how linear the retraining ground truth is (module docstring)."""

    stages: list[str]
    reproducibility: np.ndarray  # [K] Pearson(τ_k, τ_k after a nudged retraining)
    linearity: np.ndarray  # [K] Pearson(τ_k^(ε) / ε, τ_k)
    derivative: Attribution  # τ_k^(ε) / ε
    epsilon: float
    nudge: float
    model_exact: Optional[list[bool]] = None  # rows whose model-mode estimate is exact (the last stage)

    @property
    def ceiling(self) -> np.ndarray:
        """``√reproducibility`` (0 where the retrainings do not even agree in sign)."""
        return np.sqrt(np.clip(self.reproducibility, 0.0, 1.0))

    def readings(self) -> list[str]:
        """Per row, what the two numbers mean for the estimators, in words.

        Retraining counts as reproducible from 0.95 and as linear in the removal
        from 0.9; below that the question is noisy or beyond first order.
        """
        out = []
        exact = self.model_exact or [False] * len(self.stages)
        for repro, linear, model_exact in zip(self.reproducibility, self.linearity, exact):
            if model_exact:
                out.append("model mode is exact here (nothing trains after it)"
                           + ("" if linear >= LINEAR else "; linear mode is beyond first order"))
            else:
                parts = []
                if not repro >= REPRODUCIBLE:
                    parts.append(f"retraining is sensitive to its start: estimates can hardly be expected above "
                                 f"{np.sqrt(max(float(repro), 0.0)):.2f}")
                if not linear >= LINEAR:
                    parts.append("beyond first order: removing all of it is not a scaled-up small removal")
                out.append("; ".join(parts) or "first order applies")
        return out

    def to_dict(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "nudge": self.nudge,
            "stages": [
                {"stage": s, "reproducibility": float(self.reproducibility[k]), "ceiling": float(self.ceiling[k]),
                 "linearity": float(self.linearity[k]), "reading": reading}
                for k, (s, reading) in enumerate(zip(self.stages, self.readings()))
            ],
        }


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def partial_removal_start(run: Run, k: int, epsilon: float):
    """Resume point when only a fraction ``epsilon`` of stage k is removed.

    Parameters (and floating buffers) move to ``θ^(k) − ε Δ_k``. If stage k+1
    carries optimizer state, every floating state tensor moves the same
    fraction towards the state the full removal hands over (zero where that
    removal starts the optimizer fresh); step counters stay as recorded.
    """
    before, after = run.checkpoint(k - 1), run.checkpoint(k)
    start = {n: after[n] + epsilon * (before[n] - after[n]) if torch.is_floating_point(after[n]) else after[n]
             for n in after}
    if k == run.num_stages or carried_state_source(run, k + 1) is None:
        return start, None, None
    recorded = run.optimizer_state(k)
    source = counterfactual_state_source(run, k)
    target = run.optimizer_state(source) if source is not None else {}
    carried = {}
    for key, value in recorded.items():
        if key.endswith("/step") or not torch.is_floating_point(value):
            carried[key] = value
        else:
            other = target.get(key, torch.zeros_like(value))
            carried[key] = value + epsilon * (other - value)
    return start, carried, run.stage_records[k - 1].optimizer_class


def _nudged(run: Run, k: int, start: dict[str, torch.Tensor], nudge: float, seed: int) -> dict[str, torch.Tensor]:
    """``start`` plus a random parameter nudge of norm ``nudge · ‖Δ_k‖`` (deterministic in ``seed``)."""
    names = run.parameter_names
    scale = nudge * _norm(stage_delta(run, k).values())
    generator = torch.Generator().manual_seed(seed)
    noise = {n: torch.randn(start[n].shape, generator=generator, dtype=torch.float64) for n in names}
    factor = scale / max(_norm(noise.values()), 1e-300)
    return {n: (t + factor * noise[n]).to(t.dtype) if n in noise else t for n, t in start.items()}


def nudged_removal_start(run: Run, k: int, nudge: float):
    """The full removal's resume point plus a random parameter nudge of norm ``nudge · ‖Δ_k‖`` (seeded by k)."""
    start, carried, carried_from = removal_start(run, k)
    return _nudged(run, k, start, nudge, seed=10_007 * k), carried, carried_from


def _stage_variant(run: Run, k: int, variant: str, amount: float, advance) -> dict[str, torch.Tensor]:
    resume = partial_removal_start if variant == "partial" else nudged_removal_start
    return resume_after(run, k, *resume(run, k, amount), advance=advance)


def _nudged_source_removal(run: Run, k: int, source: str, nudge: float, advance) -> dict[str, torch.Tensor]:
    """Source j of stage k removed, its stage started from ``θ^(k−1)`` nudged by ``nudge · ‖Δ_k‖``."""
    start, carried, carried_from = source_removal_start(run, k)
    seed = 10_007 * k + 101 * (1 + run.sources(k).index(source))
    model = replay(run, k, _nudged(run, k, start, nudge, seed), carried, carried_from=carried_from,
                   advance=advance, source_weights={k: {source: 0.0}})
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _variant(run: Run, k: int, source: Optional[str], variant: str, amount: float, *, advance) -> tuple[dict, float]:
    """``(state dict, seconds)`` of one extra retraining, cached on the run."""
    if source is not None and variant == "partial":  # a re-run at weight 1 − ε, which the run caches itself
        without_source_model(run, k, source, weight=1.0 - amount, advance=advance)
        return run._cache[("retrained-source", k, source, float(1.0 - amount))]
    key = ("ceiling", variant, k, source, float(amount))
    if key not in run._cache:
        begin = time.perf_counter()
        if source is None:
            state = _stage_variant(run, k, variant, amount, advance)
        else:
            state = _nudged_source_removal(run, k, source, amount, advance)
        run._cache[key] = (state, time.perf_counter() - begin)
    return run._cache[key]


def truth_ceilings(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor], *, sources: bool = False,
                   epsilon: float = 0.01, nudge: float = 0.01, truth: Optional[Attribution] = None,
                   progress: bool = True) -> TruthCeilings:
    """Reproducibility, ceiling and linearity of the retraining ground truth, per stage (two retrainings each).

    ``sources=True``: per ``"stage/source"`` instead; the partial removal keeps
    the source at weight ``1 − ε``, and the nudged retraining starts its stage
    from ``θ^(k−1)`` nudged by ``nudge · ‖Δ_k‖``. ``truth``: the result of
    :func:`retrain_effects` (or :func:`retrain_source_effects`) if already computed.
    """
    from stagecredit.estimators.sources import source_label, sourced_pairs

    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    if not (math.isfinite(nudge) and nudge > 0):
        raise ValueError(f"nudge must be a finite number > 0, got {nudge}")
    K = run.num_stages
    if sources:
        rows = sourced_pairs(run)
        expected = [source_label(run.stages[k - 1], source) for k, source in rows]
        first = {k: k for k, _ in rows}
    else:
        rows = [(k, None) for k in range(1, K + 1)]
        expected = list(run.stages)
        first = {k: k + 1 for k, _ in rows}
    if truth is not None and list(truth.stages) != expected:
        raise ValueError(f"truth has rows {list(truth.stages)} but the ceilings of {'sources' if sources else 'stages'} "
                         f"need {expected}; pass the matching retrain_{'source_' if sources else ''}effects result")
    if truth is None:
        truth = (retrain_source_effects if sources else retrain_effects)(run, behaviour, progress=progress)
    total = 2 * sum(run.stage_records[j - 1].steps for k, _ in rows for j in range(first[k], K + 1))
    with progress_bar("retraining for the truth's ceilings", total, enabled=progress) as advance:
        partial = [_variant(run, k, source, "partial", epsilon, advance=advance) for k, source in rows]
        nudged = [_variant(run, k, source, "nudged", nudge, advance=advance) for k, source in rows]
    labels = list(truth.stages)
    derivative = _retrained_attribution(run, behaviour, [(label, k, state, seconds) for label, (k, _), (state, seconds)
                                                         in zip(labels, rows, partial)], truth.sign_convention,
                                        truth.notes)
    derivative.effects = derivative.effects / epsilon
    derivative.method, derivative.mode = DERIVATIVE, f"ε={epsilon:g}"
    for embedding in derivative.embeddings:
        embedding.vector = {n: v / epsilon for n, v in embedding.vector.items()}
        embedding.method = DERIVATIVE
    again = _retrained_attribution(run, behaviour, [(label, k, state, seconds) for label, (k, _), (state, seconds)
                                                    in zip(labels, rows, nudged)], truth.sign_convention, truth.notes)
    reproducibility = np.array([pearson(again.effects[i], truth.effects[i]) for i in range(len(rows))])
    linearity = np.array([pearson(derivative.effects[i], truth.effects[i]) for i in range(len(rows))])
    return TruthCeilings(labels, reproducibility, linearity, derivative, epsilon, nudge,
                         model_exact=[source is None and k == K for k, source in rows])
