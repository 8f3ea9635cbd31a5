"""Evaluating a behaviour at parameters other than the module's own, with and without a JVP."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

Behaviour = Callable[[torch.nn.Module], torch.Tensor]

# tangents pushed through one forward-mode pass together: its tangent activations are that many times one's
JVP_TANGENTS = 8


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


def behaviour_jvps(
    model: torch.nn.Module,
    behaviour: Behaviour,
    params: Mapping[str, torch.Tensor],
    tangents: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ), [∇f(θ)·v_k]_k)``: ``[N]`` and ``[K, N]``, several tangents per forward-mode pass.

    Up to ``JVP_TANGENTS`` tangents share one pass (``vmap`` over ``jvp``): the
    primal is computed once and the tangents' arithmetic is batched, about half
    the time of one pass per tangent on the benchmarks' MLPs. A behaviour
    ``vmap`` cannot batch (an op without a batching rule, ``.item()``,
    control flow on values) is evaluated one tangent at a time instead.
    """
    if not tangents:
        return behaviour_at(model, behaviour, params), torch.zeros(0)
    model.eval()
    wrapper = _BehaviourOf(model, behaviour)
    names = list(params)
    primals = tuple(params[n].detach() for n in names)

    def f(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, _prefixed(dict(zip(names, values))), ())

    def value_and_derivative(*tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return jvp(f, primals, tangent)  # the value does not depend on the tangent: vmap hands it back broadcast

    value, rows = None, []
    for start in range(0, len(tangents), JVP_TANGENTS):
        group = tangents[start:start + JVP_TANGENTS]
        stacked = tuple(torch.stack([t[n].to(params[n].dtype) for t in group]) for n in names)
        try:
            with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no forward-mode derivative
                values, derivatives = vmap(value_and_derivative)(*stacked)
            value = values[0].detach()
            rows.append(derivatives.detach())
        except RuntimeError:  # not batchable: the same derivatives one tangent at a time
            for tangent in group:
                value, one = behaviour_jvp(model, behaviour, params, tangent)
                rows.append(one.unsqueeze(0))
    return value, torch.cat(rows)
