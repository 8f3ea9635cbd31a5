"""The data part of the accountability score: what removing one source of a stage does to that stage's end state.

Removing source j of a stage (its weight ``w_j → 0``) changes every step's
minibatch gradient by ``−w_j g_{s,j}``, where ``g_{s,j}`` is the gradient of
source j's share of the step's loss. Linearised around the recorded trajectory
with ``H = 0`` (the ``aa`` assumption, DESIGN §3), the change of the training
state follows the same recurrence as a stage perturbation, driven by that
forcing term::

    δg_s = λ_coupled δθ_s − w_j g_{s,j}
    (δθ, δs) ← one linearised optimizer step (momentum, Nesterov, Adam's
               preconditioner from this step's own second moment)

It is accumulated forward while the stage trains, from ``(0, 0)``, because the
forcing needs every step's per-source gradient and storing those would cost a
parameter-sized vector per step. At the end of the stage, ``(δθ, δs)`` per
source is recorded; the estimators then carry it through the later stages
exactly like a stage perturbation. For Adam/AdamW, each source's
counterfactual moments are tracked instead of linearising Adam's map (see
:func:`~stagecredit.estimators.propagation.adam_counterfactual_step`; the
step's gradient is at hand here, unlike for stage perturbations): Adam
normalises its steps, so removing part of the gradient changes them much less
than a frozen second moment predicts. Only the first-moment part of the end
state is carried into a next stage.
"""

from __future__ import annotations

from typing import Optional

import torch

from stagecredit.estimators.optimizers import STATE_KEY, SUPPORTED, live_adam_preconditioner
from stagecredit.estimators.propagation import (
    ADAM,
    SGD,
    adam_counterfactual_step,
    adam_moments,
    adam_tangent_step,
    clip_rows,
    sgd_tangent_step,
)
from stagecredit.recording.optimizer_state import param_names_by_group


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class SourceTangents:
    """Per source of one stage, ``(δθ, δs)``: the first-order change of the state when that source is removed.

    Tangents of all S sources are stacked (``[S, *shape]`` per parameter, float64)
    and advanced together. ``step`` is the ``source_hook`` of
    :func:`~stagecredit.recording.training.train_stage`. With ``curvature`` (a
    callable ``(batch, params_before) -> product`` on flattened tangents), each
    step keeps its curvature term and the update runs in ``after_step`` instead,
    where the step's batch and starting parameters are known.
    """

    def __init__(self, model: torch.nn.Module, source_names: list[str],
                 carried_state: Optional[dict[str, torch.Tensor]], curvature=None,
                 max_grad_norm: Optional[float] = None) -> None:
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.source_names = list(source_names)
        self.carried_state = carried_state
        self.curvature = curvature
        self.unsupported: Optional[str] = None
        self._pending: Optional[tuple] = None
        # parameters entering the next step (Adam with coupled L2 needs them for the effective gradient)
        self.entering = {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}

    def _start(self, optimizer: torch.optim.Optimizer) -> None:
        """Set up from the stage's optimizer, at its first step."""
        groups = param_names_by_group(optimizer, self.model)
        optimizer_class = _class_name(optimizer)
        self.kind = SUPPORTED.get(optimizer_class)
        if self.kind is None:
            self.unsupported = f"{optimizer_class} has no linearised update here (supported: SGD, Adam, AdamW)"
        elif any(g.get("maximize", False) for g in optimizer.param_groups):
            self.unsupported = "maximize=True is not modelled"
        self.decoupled = optimizer_class == "torch.optim.adamw.AdamW"
        self.groups = groups
        self.params = dict(self.model.named_parameters())
        self.names = [n for g in groups for n in g]
        key = STATE_KEY.get(self.kind, "")
        self.fresh = {n: not self.carried_state or f"{n}/{key}" not in self.carried_state for n in self.names}
        S = len(self.source_names)
        self.theta = {n: self.params[n].new_zeros((S, *self.params[n].shape), dtype=torch.float64)
                      for n in self.names}
        self.state = {n: torch.zeros_like(v) for n, v in self.theta.items()}
        # Adam: the moments of the recorded run and of each source's counterfactual are tracked in float64 from
        # the per-source gradients (see adam_counterfactual_step), so that equal gradients give equal updates.
        self.amsgrad = any(g.get("amsgrad", False) for g in optimizer.param_groups)
        self.counterfactual_adam = self.kind == ADAM and not self.amsgrad
        self.coupled_decay = self.counterfactual_adam and not self.decoupled  # needs the parameters entering a step
        if self.counterfactual_adam:
            self.exp_avg = {n: self._carried(n, "exp_avg") for n in self.names}
            self.exp_avg_sq = {n: self._carried(n, "exp_avg_sq") for n in self.names}
            self.cf_exp_avg = {n: self.exp_avg[n].expand_as(v).clone() for n, v in self.theta.items()}
            self.cf_exp_avg_sq = {n: self.exp_avg_sq[n].expand_as(v).clone() for n, v in self.theta.items()}

    def _carried(self, name: str, key: str) -> torch.Tensor:
        value = (self.carried_state or {}).get(f"{name}/{key}")
        return torch.zeros_like(self.params[name], dtype=torch.float64) if value is None else value.to(torch.float64)

    def step(self, s: int, hyper: list[dict], grads: dict[int, dict[str, torch.Tensor]], weights: list[float],
             optimizer: torch.optim.Optimizer) -> None:
        """Advance every source's tangent through step ``s`` (``hyper``: the hyper-parameters that step used)."""
        if s == 0:
            self._start(optimizer)
        if self.unsupported is not None:
            return
        if self.curvature is not None:
            self._pending = (hyper, grads, weights)
            return
        self._advance(s, hyper, grads, weights, optimizer, None)

    def after_step(self, s: int, batch, params_before: dict[str, torch.Tensor], optimizer) -> None:
        """With curvature: the update of step ``s``, now that its batch and starting parameters are known."""
        if self.curvature is None or self.unsupported is not None:
            return
        hyper, grads, weights = self._pending
        hv = self.curvature(batch, params_before)({n: v for n, v in self.theta.items()})
        self._advance(s, hyper, grads, weights, optimizer, hv)

    def _advance(self, s, hyper, grads, weights, optimizer, hv: Optional[dict[str, torch.Tensor]]) -> None:
        clipped = None if self.max_grad_norm is None else self._clipped_gradients(grads, weights, hv)
        for g, names in enumerate(self.groups):
            hp = {**hyper[g], "decoupled_weight_decay": True} if self.decoupled else hyper[g]
            for n in names:
                if self.params[n].grad is None:  # torch's optimizer skipped it (frozen, unused): no step, no state
                    continue
                hvp = None if hv is None else (lambda _x, n=n: hv[n].to(torch.float64))
                t = None if self.kind == SGD else int(optimizer.state[self.params[n]]["step"])
                if clipped is not None:  # the curvature term is inside the clipped counterfactual gradients
                    hvp, factual, counterfactual = None, clipped[0][n], clipped[1][n]
                    forcing = counterfactual - factual
                elif self.counterfactual_adam:
                    factual, counterfactual = self._gradients(n, grads, weights)
                else:
                    forcing = self._forcing(n, grads, weights)
                if self.counterfactual_adam:
                    self._counterfactual_adam(n, hp, t, factual, counterfactual, hvp)
                elif self.kind == SGD:
                    self.theta[n], self.state[n] = sgd_tangent_step(
                        self.theta[n], self.state[n], hp, first=self.fresh[n] and s == 0, hvp=hvp, forcing=forcing)
                else:  # amsgrad: the preconditioner from the running maximum, frozen along the tangent
                    precond = live_adam_preconditioner(optimizer, self.params[n], hp).to(torch.float64)
                    self.theta[n], self.state[n] = adam_tangent_step(
                        self.theta[n], self.state[n], hp, t=t, precond=precond, hvp=hvp, forcing=forcing)
        if self.coupled_decay:
            self.entering = {n: p.detach().to(torch.float64).clone() for n, p in self.params.items()}

    def _forcing(self, n: str, grads, weights) -> torch.Tensor:
        """``−w_j g_j`` for every source j, stacked: the change of the step's gradient when j is removed."""
        forcing = torch.zeros_like(self.theta[n])
        for j in range(len(self.source_names)):
            grad = grads.get(j, {}).get(n)
            if grad is not None:
                forcing[j] = -weights[j] * grad.to(torch.float64)
        return forcing

    def _gradients(self, n: str, grads, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameter ``n``'s step gradient, and per source (stacked) the gradient without it (float64).

        Each source's counterfactual gradient is summed from the other sources,
        never by subtraction, so a coordinate only the removed source touched
        gets exactly zero (Adam would blow up rounding).
        """
        parts = {j: weights[j] * grads[j][n].to(torch.float64)
                 for j in range(len(self.source_names)) if weights[j] != 0 and n in grads.get(j, {})}
        zero = torch.zeros_like(self.entering[n])
        factual = sum(parts.values(), zero)
        counterfactual = torch.stack([sum((g for i, g in parts.items() if i != j), zero)
                                      for j in range(len(self.source_names))])
        return factual, counterfactual

    def _clipped_gradients(self, grads, weights, hv) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The stage clips its gradients: the step's clipped gradient, and per source the clipped counterfactual.

        Each counterfactual (the gradient without the source, plus the
        curvature term ``C δθ`` when kept) is clipped exactly, its norm taken
        over every parameter with a gradient, as the stage clipped the real one.
        """
        names = [n for n in self.params if any(n in per_source for per_source in grads.values())]
        pairs = {n: self._gradients(n, grads, weights) for n in names}
        factual = clip_rows({n: f.unsqueeze(0) for n, (f, _) in pairs.items()}, self.max_grad_norm)
        counterfactual = clip_rows({n: c + hv[n].to(torch.float64) if hv is not None and n in hv else c
                                    for n, (_, c) in pairs.items()}, self.max_grad_norm)
        return {n: v[0] for n, v in factual.items()}, counterfactual

    def _counterfactual_adam(self, n: str, hp: dict, t: int, factual: torch.Tensor, counterfactual: torch.Tensor,
                             hvp) -> None:
        coupled = 0.0 if self.decoupled or not hp.get("weight_decay", 0.0) else hp["weight_decay"] * self.entering[n]
        factual = factual + coupled
        self.exp_avg[n], self.exp_avg_sq[n] = adam_moments(self.exp_avg[n], self.exp_avg_sq[n], factual, hp["betas"])
        cf_grad = counterfactual + coupled
        self.theta[n], self.cf_exp_avg[n], self.cf_exp_avg_sq[n] = adam_counterfactual_step(
            self.theta[n], self.cf_exp_avg[n], self.cf_exp_avg_sq[n], hp, t=t, exp_avg=self.exp_avg[n],
            exp_avg_sq=self.exp_avg_sq[n], cf_grad=cf_grad, hvp=hvp)
        self.state[n] = self.cf_exp_avg[n] - self.exp_avg[n]

    def tangent(self, j: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(δθ, δs)`` of source ``j`` at the end of the stage, for every parameter (zero where the stage trains none)."""
        def zero(n):
            return torch.zeros_like(self.params[n], dtype=torch.float64)

        return ({n: self.theta[n][j] if n in self.theta else zero(n) for n in self.params},
                {n: self.state[n][j] if n in self.state else zero(n) for n in self.params})

    def tensors(self) -> dict[str, torch.Tensor]:
        """``"<source>/theta/<param>"`` and ``"<source>/state/<param>"`` tensors (float64) to record."""
        out = {}
        for j, name in enumerate(self.source_names):
            theta, state = self.tangent(j)
            for n in theta:
                out[f"{name}/theta/{n}"] = theta[n].contiguous()
                out[f"{name}/state/{n}"] = state[n].contiguous()
        return out
