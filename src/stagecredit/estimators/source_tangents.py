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
exactly like a stage perturbation. The first-order change of Adam's second
moment is neglected, as it is for stage perturbations.
"""

from __future__ import annotations

from typing import Optional

import torch

from stagecredit.estimators.optimizers import STATE_KEY, SUPPORTED, live_adam_preconditioner
from stagecredit.estimators.propagation import SGD, adam_tangent_step, sgd_tangent_step


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class SourceTangents:
    """Per source of one stage, ``(δθ, δs)``: the first-order change of the state when that source is removed."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, groups: list[list[str]],
                 source_names: list[str], carried_state: Optional[dict[str, torch.Tensor]]) -> None:
        optimizer_class = _class_name(optimizer)
        self.kind = SUPPORTED.get(optimizer_class)
        self.unsupported: Optional[str] = None
        if self.kind is None:
            self.unsupported = f"{optimizer_class} has no linearised update here (supported: SGD, Adam, AdamW)"
        elif any(g.get("maximize", False) for g in optimizer.param_groups):
            self.unsupported = "maximize=True is not modelled"
        self.decoupled = optimizer_class == "torch.optim.adamw.AdamW"
        self.groups = groups
        self.source_names = list(source_names)
        self.params = dict(model.named_parameters())
        names = [n for g in groups for n in g]
        key = STATE_KEY.get(self.kind, "")
        self.fresh = {n: not carried_state or f"{n}/{key}" not in carried_state for n in names}
        self.theta = [{n: torch.zeros_like(self.params[n], dtype=torch.float64) for n in names} for _ in source_names]
        self.state = [{n: torch.zeros_like(v) for n, v in t.items()} for t in self.theta]

    def step(self, s: int, hyper: list[dict], grads: dict[int, dict[str, torch.Tensor]], weights: list[float],
             optimizer: torch.optim.Optimizer) -> None:
        """Advance every source's tangent through step ``s`` (``hyper``: the hyper-parameters that step used)."""
        if self.unsupported is not None:
            return
        for j in range(len(self.source_names)):
            theta, state = self.theta[j], self.state[j]
            for g, names in enumerate(self.groups):
                hp = {**hyper[g], "decoupled_weight_decay": True} if self.decoupled else hyper[g]
                for n in names:
                    grad = grads.get(j, {}).get(n)
                    forcing = None if grad is None else -weights[j] * grad.to(torch.float64)
                    if self.kind == SGD:
                        theta[n], state[n] = sgd_tangent_step(theta[n], state[n], hp, first=self.fresh[n] and s == 0,
                                                              forcing=forcing)
                    else:
                        t = int(optimizer.state[self.params[n]]["step"])
                        precond = live_adam_preconditioner(optimizer, self.params[n], hp).to(torch.float64)
                        theta[n], state[n] = adam_tangent_step(theta[n], state[n], hp, t=t, precond=precond,
                                                               forcing=forcing)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``"<source>/theta/<param>"`` and ``"<source>/state/<param>"`` tensors (float64) to record."""
        out = {}
        for name, theta, state in zip(self.source_names, self.theta, self.state):
            for n in theta:
                out[f"{name}/theta/{n}"] = theta[n]
                out[f"{name}/state/{n}"] = state[n]
        return out
