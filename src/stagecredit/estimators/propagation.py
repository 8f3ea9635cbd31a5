"""How a perturbation of the training state travels through later training steps.

This is the accountability-attribution (AA) propagation of DESIGN §3. Removing
stage k changes the state at the end of stage k by ``(δθ, δs)`` — parameters
and the optimizer's first-moment buffer (SGD momentum buffer or Adam
``exp_avg``). Each later step is linearised around the recorded trajectory:

* SGD (torch semantics, coupled L2): ``δg = (H + λ) δθ``; the momentum buffer
  ``δb ← μ δb + (1 − dampening) δg`` (the first step of a fresh optimizer
  copies ``δg``); Nesterov steps along ``δg + μ δb``; ``δθ ← δθ − η · step``.
* Adam / AdamW: ``δg = (H + λ_coupled) δθ``; decoupled decay first scales
  ``δθ`` by ``(1 − η λ)``; ``δm ← β1 δm + (1 − β1) δg``;
  ``δθ ← δθ − η / (1 − β1^t) · P δm`` with ``P = diag(1 / (√v̂ + ε))``.
  The first-order change of the second moment ``v`` is neglected, and ``v̂``
  is taken from the optimizer state recorded at the end of the stage (Adam's
  bias-corrected second moment is close to stationary within a stage).

Gradient clipping (``Stage(max_grad_norm=…)``) scales only the loss gradient,
never the decay: with ``H = 0`` the loss gradient does not change, so ``aa``
is unaffected; where the curvature is kept, a step's change of gradient is
that of the clipped gradient (:func:`clip_rows`).

With ``H = 0`` (the ``aa`` estimator) every coefficient is a scalar per
parameter group — or a per-parameter diagonal when Adam's preconditioner acts
on a non-zero ``δm`` — so a whole stage collapses to a 2×2 map
(:class:`StageTransition`) that is computed once from the recorded schedule and
applied to ``Δ_k`` in one pass. A non-``None`` ``hvp`` keeps the curvature term.

Functions here are pure: tensors and recorded hyper-parameters in, tensors out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import torch

Coefficient = Union[torch.Tensor, float]
HVP = Callable[[torch.Tensor], torch.Tensor]

SGD = "sgd"
ADAM = "adam"


def sgd_tangent_step(
    dtheta: torch.Tensor,
    dbuf: torch.Tensor,
    hp: dict[str, Any],
    *,
    first: bool,
    hvp: Optional[HVP] = None,
    forcing: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearised ``torch.optim.SGD`` step applied to a tangent ``(δθ, δbuffer)``.

    ``forcing``: a change of the minibatch gradient that does not come from
    ``δθ`` (e.g. ``−g_j`` when the examples of source j are removed from the step).
    """
    lr, mu, damp, lam = hp["lr"], hp.get("momentum", 0.0), hp.get("dampening", 0.0), hp.get("weight_decay", 0.0)
    dg = lam * dtheta
    if hvp is not None:
        dg = dg + hvp(dtheta)
    if forcing is not None:
        dg = dg + forcing
    if mu != 0:
        dbuf = dg if first else mu * dbuf + (1 - damp) * dg
        direction = dg + mu * dbuf if hp.get("nesterov", False) else dbuf
    else:
        direction = dg
    return dtheta - lr * direction, dbuf


def adam_tangent_step(
    dtheta: torch.Tensor,
    dm: torch.Tensor,
    hp: dict[str, Any],
    *,
    t: int,
    precond: Coefficient,
    hvp: Optional[HVP] = None,
    forcing: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearised ``torch.optim.Adam``/``AdamW`` step applied to ``(δθ, δexp_avg)``; ``forcing`` as for SGD."""
    lr, lam = hp["lr"], hp.get("weight_decay", 0.0)
    beta1 = hp["betas"][0]
    decoupled = hp.get("decoupled_weight_decay", False)
    dg = hvp(dtheta) if hvp is not None else 0.0 * dtheta
    if forcing is not None:
        dg = dg + forcing
    if decoupled:
        dtheta = dtheta * (1 - lr * lam)
    elif lam != 0:
        dg = dg + lam * dtheta
    dm = beta1 * dm + (1 - beta1) * dg
    return dtheta - (lr / (1 - beta1**t)) * precond * dm, dm


def clip_rows(rows: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Every row ``b`` of ``rows`` (``[B, *shape]`` per parameter) clipped as ``torch.nn.utils.clip_grad_norm_``
    clips a gradient: scaled by ``min(1, max_norm / (‖row_b‖ + 1e-6))``, the norm taken over every parameter."""
    squares = sum((v.reshape(v.shape[0], -1).to(torch.float64) ** 2).sum(1) for v in rows.values())
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    return {n: v * scale.reshape(-1, *([1] * (v.ndim - 1))).to(v.dtype) for n, v in rows.items()}


def adam_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                 betas) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moment update for one step: ``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) g²``."""
    beta1, beta2 = betas
    return beta1 * exp_avg + (1 - beta1) * grad, beta2 * exp_avg_sq + (1 - beta2) * grad * grad


def adam_counterfactual_step(
    dtheta: torch.Tensor,
    cf_exp_avg: torch.Tensor,
    cf_exp_avg_sq: torch.Tensor,
    hp: dict[str, Any],
    *,
    t: int,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    cf_grad: torch.Tensor,
    hvp: Optional[HVP] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam/AdamW step of a counterfactual run, with Adam's own map kept exactly.

    ``cf_grad`` is the counterfactual run's effective gradient at the recorded
    parameters (e.g. the step's gradient without one data source, plus coupled
    decay); its dependence on ``δθ`` is taken to first order (``C δθ +
    λ_coupled δθ``). The counterfactual moments ``m̃ ← β1 m̃ + (1 − β1) g̃`` and
    ``ṽ ← β2 ṽ + (1 − β2) g̃²`` are tracked, and ``δθ`` moves by the difference
    of the two runs' updates. Adam normalises its steps, so removing a large
    part of the gradient changes them far less than a frozen second moment
    (or its first-order change) predicts; its derivative at ``g̃ = g`` is the
    linearisation with the second moment's change included.
    ``exp_avg``/``exp_avg_sq``: the recorded run's moments after this step,
    computed the same way (so that equal gradients give exactly equal updates).
    """
    lr, lam = hp["lr"], hp.get("weight_decay", 0.0)
    beta1, beta2 = hp["betas"]
    decoupled = hp.get("decoupled_weight_decay", False)
    dg = hvp(dtheta) if hvp is not None else 0.0 * dtheta
    if decoupled:
        dtheta = dtheta * (1 - lr * lam)
    elif lam != 0:
        dg = dg + lam * dtheta
    cf_exp_avg, cf_exp_avg_sq = adam_moments(cf_exp_avg, cf_exp_avg_sq, cf_grad + dg, (beta1, beta2))
    bias1, bias2 = 1 - beta1**t, 1 - beta2**t
    eps = hp["eps"]
    factual = exp_avg / ((exp_avg_sq / bias2).sqrt() + eps)
    counterfactual = cf_exp_avg / ((cf_exp_avg_sq / bias2).sqrt() + eps)
    return dtheta - (lr / bias1) * (counterfactual - factual), cf_exp_avg, cf_exp_avg_sq


def propagate_through_stage(
    dtheta: Coefficient,
    dstate: Coefficient,
    steps: Sequence[dict[str, Any]],
    group: int,
    kind: str,
    *,
    fresh: bool,
    precond: Coefficient = 1.0,
    hvp_at: Optional[Callable[[int], HVP]] = None,
) -> tuple[Coefficient, Coefficient]:
    """Carry ``(δθ, δs)`` for one param group through every recorded step of a stage.

    ``fresh``: the stage started with a new optimizer, so the incoming ``δs`` is
    dropped (both runs start the buffer from nothing). ``hvp_at(step)`` returns
    the Hessian-vector product at that step, or ``None`` for ``H = 0``.
    """
    if fresh:
        dstate = 0.0 * dstate
    for i, record in enumerate(steps):
        hp = record["groups"][group]
        hvp = hvp_at(i) if hvp_at is not None else None
        if kind == SGD:
            dtheta, dstate = sgd_tangent_step(dtheta, dstate, hp, first=fresh and i == 0, hvp=hvp)
        else:
            dtheta, dstate = adam_tangent_step(dtheta, dstate, hp, t=record["adam_step"], precond=precond, hvp=hvp)
    return dtheta, dstate


def _step_coefficients(steps: Sequence[dict[str, Any]], group: int, kind: str, *, fresh: bool,
                       precond: float = 1.0) -> torch.Tensor:
    """``[S, 6]``: each step's linear map on ``(δθ, δs)`` given its change of gradient ``δg``, as six scalars.

    Every step of :func:`sgd_tangent_step` / :func:`adam_tangent_step` (with a
    scalar ``precond``) has the form ``δs' = p δs + q δg``,
    ``δθ' = d δθ − a δg − b δs`` with ``δg = λ δθ + (curvature term)``;
    columns ``(λ, d, p, q, a, b)``.
    """
    rows = []
    for i, record in enumerate(steps):
        hp = record["groups"][group]
        lr, lam = hp["lr"], hp.get("weight_decay", 0.0)
        if kind == SGD:
            mu, damp = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
            if mu == 0:
                p, q, u, v = 1.0, 0.0, 0.0, 1.0  # the buffer is untouched; the step follows δg
            else:
                p, q = (0.0, 1.0) if fresh and i == 0 else (mu, 1 - damp)
                u, v = (mu, 1.0) if hp.get("nesterov", False) else (1.0, 0.0)
            d = 1.0
        else:
            beta1 = hp["betas"][0]
            p, q, u, v = beta1, 1 - beta1, precond / (1 - beta1 ** record["adam_step"]), 0.0
            decoupled = hp.get("decoupled_weight_decay", False)
            d, lam = (1 - lr * lam, 0.0) if decoupled else (1.0, lam)
        # δθ' = d δθ − lr (u δs' + v δg) = d δθ − lr (u q + v) δg − lr u p δs
        rows.append((lam, d, p, q, lr * (u * q + v), lr * u * p))
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


def _compose(maps: torch.Tensor) -> torch.Tensor:
    """``maps[S−1] @ … @ maps[0]`` for ``maps [S, …, k, k]`` (S ≥ 1), multiplied pairwise in ⌈log₂ S⌉ rounds."""
    while maps.shape[0] > 1:  # later @ earlier, pairwise; an odd one out waits for the next round
        odd = maps[-1:] if maps.shape[0] % 2 else None
        pairs = maps[: maps.shape[0] - maps.shape[0] % 2]
        maps = pairs[1::2] @ pairs[0::2]
        if odd is not None:
            maps = torch.cat([maps, odd])
    return maps[0]


def segment_maps(ritz: torch.Tensor, steps: Sequence[dict[str, Any]], group: int, kind: str, *, fresh: bool,
                 curvature_scale: Sequence[float], precond: float = 1.0) -> torch.Tensor:
    """``[*ritz.shape, 3, 3]``: the map of every step in ``steps`` composed, one per eigenvalue ``r`` in ``ritz``.

    Each step's change of gradient is ``δg = λ δθ + c_s (r δθ + f)``, with
    ``c_s = curvature_scale[s]`` and ``f`` a constant forcing; on the state
    ``(δθ, δs, f)`` a step is an affine 3×3 map, and the segment is their
    product. Column 0 is the map's response to ``(1, 0)``, column 1 to
    ``(0, 1)``, column 2 to a unit forcing from ``(0, 0)``; rows are ``δθ``,
    ``δs`` and ``f``. The same as stepping :func:`propagate_through_stage` with
    ``hvp_at(s) = c_s (r x + f)``, but the steps are multiplied pairwise in
    ``log₂ S`` batched rounds instead of one small update per step in Python.
    ``fresh``: the stage started with a new optimizer, so the incoming ``δs`` is dropped.
    ``precond``: Adam's preconditioner, one scalar for every coordinate.
    """
    coefficients = _step_coefficients(steps, group, kind, fresh=fresh, precond=precond)
    lam, d, p, q, a, b = (c.reshape(-1, *([1] * ritz.ndim)) for c in coefficients.unbind(1))
    c = torch.tensor(list(curvature_scale), dtype=torch.float64).reshape(lam.shape)
    r = ritz.to(torch.float64).unsqueeze(0)
    alpha = lam + c * r  # δg per unit δθ
    shape = alpha.shape
    zero, one = torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
    maps = torch.stack([
        torch.stack([d - a * alpha, (-b).expand(shape), (-a * c).expand(shape)], -1),
        torch.stack([q * alpha, p.expand(shape), (q * c).expand(shape)], -1),
        torch.stack([zero, zero, one], -1),
    ], -2)  # [S, *ritz, 3, 3]
    total = _compose(maps) if len(maps) else torch.eye(3, dtype=torch.float64).expand(*ritz.shape, 3, 3)
    if fresh:
        total = total.clone()
        total[..., 1] = 0.0
    return total


@dataclasses.dataclass(frozen=True)
class StageTransition:
    """The linear map of one stage on ``(δθ, δs)``, with ``H = 0``::

        δθ' = tt·δθ + ts·δs
        δs' = st·δθ + ss·δs

    Entries are Python floats (one scalar per param group) or per-parameter
    diagonals (float64 tensors).
    """

    tt: Coefficient
    ts: Coefficient
    st: Coefficient
    ss: Coefficient

    @classmethod
    def identity(cls) -> "StageTransition":
        return cls(1.0, 0.0, 0.0, 1.0)

    @classmethod
    def untouched(cls) -> "StageTransition":
        """A parameter the stage's optimizer never steps: ``δθ`` passes through, and neither run hands on a buffer."""
        return cls(1.0, 0.0, 0.0, 0.0)

    def then(self, later: "StageTransition") -> "StageTransition":
        """The map that applies ``self`` first and ``later`` after it."""
        return StageTransition(
            tt=later.tt * self.tt + later.ts * self.st,
            ts=later.tt * self.ts + later.ts * self.ss,
            st=later.st * self.tt + later.ss * self.st,
            ss=later.st * self.ts + later.ss * self.ss,
        )

    def apply(self, dtheta: torch.Tensor, dstate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tt * dtheta + self.ts * dstate, self.st * dtheta + self.ss * dstate


def stage_transition(
    steps: Sequence[dict[str, Any]],
    group: int,
    kind: str,
    *,
    fresh: bool,
    precond: Coefficient = 1.0,
) -> StageTransition:
    """Compose a stage's ``H = 0`` steps into one :class:`StageTransition`.

    With scalar coefficients, the steps' maps are multiplied pairwise in
    float64 (:func:`segment_maps` without curvature); with a per-parameter
    ``precond`` tensor, the two basis tangents ``(1, 0)`` and ``(0, 1)`` are
    propagated step by step as diagonals.
    """
    if isinstance(precond, torch.Tensor):
        p = precond.to(torch.float64)
        one, zero = torch.ones_like(p), torch.zeros_like(p)
        tt, st = propagate_through_stage(one, zero, steps, group, kind, fresh=fresh, precond=p)
        ts, ss = propagate_through_stage(zero, one, steps, group, kind, fresh=fresh, precond=p)
        return StageTransition(tt=tt, ts=ts, st=st, ss=ss)
    # scalars: segment_maps without curvature, the steps multiplied pairwise in batched rounds rather than one
    # Python update per step (a stage of 10⁴ steps costs milliseconds)
    total = segment_maps(torch.zeros(()), steps, group, kind, fresh=fresh, curvature_scale=[0.0] * len(steps),
                         precond=float(precond))
    (tt, ts, _), (st, ss, _), _ = total.tolist()
    return StageTransition(tt=tt, ts=ts, st=st, ss=ss)
