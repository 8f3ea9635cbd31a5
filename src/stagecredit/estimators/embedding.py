"""Stage embeddings ``e_k`` (``θ_T^(−k) ≈ θ_T − e_k``) for each estimator."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from stagecredit.call_site import warn
from stagecredit.estimators.optimizers import (
    STATE_KEY,
    adam_preconditioner,
    carried_state_source,
    counterfactual_state_source,
    stage_kind,
    stage_steps,
    stepped_names,
)
from stagecredit.estimators.propagation import ADAM, StageTransition, stage_transition
from stagecredit.storage.run import Run

METHODS = ("delta", "aa", "aa-curvature")


@dataclasses.dataclass
class StageEmbedding:
    """``e_k``: how far the final parameters sit from where they would be without stage k."""

    stage: str
    index: int  # 1-based, θ^(index) ends this stage
    method: str
    vector: dict[str, torch.Tensor]
    seconds: float

    def norm(self) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.vector.values())))


def stage_delta(run: Run, k: int) -> dict[str, torch.Tensor]:
    """``Δ_k = θ^(k) − θ^(k−1)``, exactly, from the recorded checkpoints."""
    after, before = run.parameters(k), run.parameters(k - 1)
    return {name: after[name] - before[name] for name in run.parameter_names}


def _state_tensor(run: Run, k: Optional[int], name: str, key: str, like: torch.Tensor) -> torch.Tensor:
    if k is None:
        return torch.zeros_like(like, dtype=torch.float64)
    value = run.optimizer_state(k).get(f"{name}/{key}")
    return torch.zeros_like(like, dtype=torch.float64) if value is None else value.to(torch.float64)


def stage_transitions(run: Run, j: int, method: str = "aa") -> dict[str, StageTransition]:
    """The ``H = 0`` transition of stage ``j`` for every parameter of the run."""
    kind = stage_kind(run, j, method)
    record = run.stage_records[j - 1]
    steps = stage_steps(run, j)
    source = carried_state_source(run, j)
    # a parameter outside the optimizer, or one it holds but never stepped (no gradient), does not move
    stepped = stepped_names(run, j)
    out = {n: StageTransition.untouched() for n in run.parameter_names if n not in stepped}
    if kind == ADAM and source is not None:
        warn(
            f"stage {record.name!r} carries Adam state from the stage before it: 'aa' propagates the difference in "
            "exp_avg but not in exp_avg_sq or the bias-correction step count, so the effect of skipping the stage "
            "before it is approximate even when later losses are linear",
        )
    for g, names in enumerate(record.param_groups):
        names = [n for n in names if n not in out]
        hp = steps[-1]["groups"][g]
        coupled_decay = any(s["groups"][g].get("weight_decay", 0.0) != 0 for s in steps) and not hp.get(
            "decoupled_weight_decay", False
        )
        if kind == ADAM and (coupled_decay or source is not None):
            # δm can be non-zero, so Adam's per-parameter preconditioner matters.
            for name in names:
                precond = adam_preconditioner(run, j, name, hp)
                out[name] = stage_transition(steps, g, kind, fresh=source is None, precond=precond)
        else:
            shared = None
            for name in names:
                fresh = source is None or f"{name}/{STATE_KEY[kind]}" not in run.optimizer_state(source)
                if shared is None or shared[0] != fresh:
                    shared = (fresh, stage_transition(steps, g, kind, fresh=fresh))
                out[name] = shared[1]
    return out


def initial_perturbation(run: Run, k: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(δθ, δs)`` at the end of stage k when stage k is removed (float64, per parameter).

    ``δθ = −Δ_k``; ``δs`` is the change of the first-moment buffer handed to
    stage k+1 — non-zero only when stage k+1 carries optimizer state.
    """
    delta = stage_delta(run, k)
    d_theta = {n: -d.to(torch.float64) for n, d in delta.items()}
    d_state = {n: torch.zeros_like(d) for n, d in d_theta.items()}
    if k < run.num_stages and carried_state_source(run, k + 1) is not None:
        key = STATE_KEY[stage_kind(run, k + 1, "aa")]
        source = counterfactual_state_source(run, k)
        for n, d in d_theta.items():
            d_state[n] = _state_tensor(run, source, n, key, d) - _state_tensor(run, k, n, key, d)
    return d_theta, d_state


def delta_embeddings(run: Run) -> list[StageEmbedding]:
    out = []
    for k, record in enumerate(run.stage_records, start=1):
        start = time.perf_counter()
        vector = stage_delta(run, k)
        out.append(StageEmbedding(record.name, k, "delta", vector, time.perf_counter() - start))
    return out


def aa_suffix_maps(run: Run) -> dict[int, dict[str, StageTransition]]:
    """Per stage k and parameter, the ``H = 0`` map from the end of stage k to the end of training (cached).

    Composed from the last stage backwards, so each later stage's schedule is
    walked once for every perturbation.
    """
    if ("aa-suffix",) not in run._cache:
        K = run.num_stages
        names = run.parameter_names
        transitions = {j: stage_transitions(run, j) for j in range(2, K + 1)}
        suffix: dict[int, dict[str, StageTransition]] = {K: {n: StageTransition.identity() for n in names}}
        for k in range(K - 1, 0, -1):
            suffix[k] = {n: transitions[k + 1][n].then(suffix[k + 1][n]) for n in names}
        run._cache[("aa-suffix",)] = suffix
    return run._cache[("aa-suffix",)]


def aa_propagate(run: Run, k: int, d_theta: dict[str, torch.Tensor],
                 d_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``δθ`` at the end of training from ``(δθ, δs)`` at the end of stage k, with every later step at ``H = 0``."""
    suffix = aa_suffix_maps(run)[k]
    return {n: suffix[n].apply(d_theta[n], d_state[n])[0] for n in run.parameter_names}


def aa_embeddings(run: Run) -> list[StageEmbedding]:
    """``e_k`` with every later step linearised at ``H = 0`` (DESIGN §3, estimator 2)."""
    K = run.num_stages
    start = time.perf_counter()
    aa_suffix_maps(run)
    shared_seconds = time.perf_counter() - start

    out = []
    for k, record in enumerate(run.stage_records, start=1):
        t0 = time.perf_counter()
        propagated = aa_propagate(run, k, *initial_perturbation(run, k))
        vector = {n: (-v).to(run.parameters(k)[n].dtype) for n, v in propagated.items()}
        out.append(StageEmbedding(record.name, k, "aa", vector, time.perf_counter() - t0 + shared_seconds / K))
    return out


def stage_embeddings(run: Run, method: str, curvature=None, *, progress: bool = True) -> list[StageEmbedding]:
    """All K stage embeddings for ``method``, cached on the run.

    ``curvature`` (a ``CurvatureOptions``) tunes ``aa-curvature`` and is ignored otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "aa-curvature":
        from stagecredit.estimators.curvature_propagation import CurvatureOptions, curvature_embeddings

        options = curvature or CurvatureOptions()
        key = ("embeddings", method, options.key())
        if key not in run._cache:
            run._cache[key] = curvature_embeddings(run, options, progress=progress)
        return run._cache[key]
    key = ("embeddings", method)
    if key not in run._cache:
        run._cache[key] = delta_embeddings(run) if method == "delta" else aa_embeddings(run)
    return run._cache[key]
