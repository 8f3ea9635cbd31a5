"""Curvature-vector products of a stage's training loss, batched over tangents.

The training loss is the stage's own ``loss_fn(model, batch)`` (averaged over
the batch), evaluated at given parameters with ``torch.func``. Two curvatures:

* ``"hessian"``: ``H v`` by forward-over-reverse differentiation;
* ``"ggn"``: the Gauss–Newton ``Jᵀ H_L J v`` (positive semi-definite for convex
  losses such as cross-entropy). It splits ``loss_fn`` into the model's output
  and the loss of that output by calling ``loss_fn`` with a stand-in model that
  returns a given output, so ``loss_fn`` must call the model exactly once.

The model is evaluated in eval mode (dropout off), a deterministic stand-in for
the training-mode step. Vectors are flat ``[B, n]`` tensors over the trainable
parameters in a fixed order (:class:`FlatParams`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

CURVATURES = ("hessian", "ggn")


@dataclasses.dataclass(frozen=True)
class FlatParams:
    """A fixed order of named parameters and the maps between dicts and flat vectors."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor], names) -> "FlatParams":
        return cls(tuple(names), tuple(params[n].shape for n in names))

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: [*lead, *shape]}`` → ``[*lead, n]``."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            lead = t.shape[: t.ndim - len(shape)]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, pieces, self.shapes)}


class _LossOf(torch.nn.Module):
    """``loss_fn(model, batch)`` averaged, as a module ``functional_call`` can re-parametrise."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batch: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch

    def forward(self) -> torch.Tensor:
        loss = self.loss_fn(self.model, self.batch)
        return loss.mean() if loss.ndim > 0 else loss


class _OutputOf(_LossOf):
    """Runs ``loss_fn`` once with a spy model to capture the model call's output."""

    def forward(self) -> torch.Tensor:
        outputs = []

        class Spy(torch.nn.Module):
            def forward(spy, *args, **kwargs):  # noqa: N805 - the spy forwards to the real model
                out = self.model(*args, **kwargs)
                outputs.append(out)
                return out

        self.loss_fn(Spy(), self.batch)
        if len(outputs) != 1:
            raise ValueError(f"curvature='ggn' needs loss_fn to call the model exactly once; it called it {len(outputs)} times")
        return outputs[0]


def _stand_in_loss(loss_fn: Callable, batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss as a function of the model's output ``z``."""

    class StandIn(torch.nn.Module):
        def __init__(self, z):
            super().__init__()
            self.z = z

        def forward(self, *args, **kwargs):
            return self.z

    def loss_of_output(z: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(StandIn(z), batch)
        return loss.mean() if loss.ndim > 0 else loss

    return loss_of_output


def curvature_product(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: Any,
    params: Mapping[str, torch.Tensor],
    flat: FlatParams,
    curvature: str = "ggn",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V [B, n] ↦ C V [B, n]`` with ``C`` the Hessian or GGN of the mean loss on ``batch`` at ``params``."""
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
    model.eval()
    p0 = flat.flatten({n: params[n].detach() for n in flat.names})
    prefixed = lambda v: {f"model.{n}": t for n, t in flat.unflatten(v).items()}  # noqa: E731

    if curvature == "hessian":
        wrapper = _LossOf(model, loss_fn, batch)

        def loss(v: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapper, prefixed(v), ())

        grad_fn = grad(loss)

        def one(v: torch.Tensor) -> torch.Tensor:
            return jvp(grad_fn, (p0,), (v,))[1]

    else:
        wrapper = _OutputOf(model, loss_fn, batch)

        def output(v: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapper, prefixed(v), ())

        z0, pullback = vjp(output, p0)
        loss_grad = grad(_stand_in_loss(loss_fn, batch))
        z0 = z0.detach()

        def one(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(output, (p0,), (v,))[1]
            hjv = jvp(loss_grad, (z0,), (jv,))[1]
            return pullback(hjv)[0]

    batched = vmap(one)

    def product(vectors: torch.Tensor) -> torch.Tensor:
        try:
            return batched(vectors)
        except Exception:  # some models' ops have no batching rule: the same products one at a time
            return torch.stack([one(v) for v in vectors])

    return product
