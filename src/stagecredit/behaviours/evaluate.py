"""Evaluating a behaviour at parameters other than the module's own, with and without a JVP."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

Behaviour = Callable[[torch.nn.Module], torch.Tensor]


class _BehaviourOf(torch.nn.Module):
    """Wraps ``behaviour(model)`` as a module so ``functional_call`` can swap its parameters."""

    def __init__(self, model: torch.nn.Module, behaviour: Behaviour) -> None:
        super().__init__()
        self.model = model
        self.behaviour = behaviour

    def forward(self) -> torch.Tensor:
        out = self.behaviour(self.model)
        if not isinstance(out, torch.Tensor) or out.ndim != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"a behaviour must return a 1-D tensor [N], got {shape}")
        return out


def _prefixed(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{name}": value for name, value in params.items()}


@torch.no_grad()
def behaviour_at(model: torch.nn.Module, behaviour: Behaviour, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``f(θ)`` with ``θ = params`` (buffers stay the model's own)."""
    model.eval()
    return functional_call(_BehaviourOf(model, behaviour), _prefixed(params), ()).detach()


def behaviour_jvp(
    model: torch.nn.Module,
    behaviour: Behaviour,
    params: Mapping[str, torch.Tensor],
    tangent: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ), ∇f(θ)·v)`` by one forward-mode pass — no per-example gradients are formed."""
    model.eval()
    wrapper = _BehaviourOf(model, behaviour)
    names = list(params)
    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(tangent[n].to(params[n].dtype) for n in names)

    def f(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, _prefixed(dict(zip(names, values))), ())

    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no forward-mode derivative
        value, derivative = jvp(f, primals, tangents)
    return value.detach(), derivative.detach()
