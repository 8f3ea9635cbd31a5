"""Curvature-vector products of a stage's training loss, batched over tangents.

The training loss is the stage's own ``loss_fn(model, batch)`` (averaged over
the batch), evaluated at given parameters (``torch.func.functional_call``) and
differentiated twice in reverse mode. Two curvatures:

* ``"hessian"``: ``H v``, the gradient's graph pulled back along ``v``;
* ``"ggn"``: the Gauss–Newton ``Jᵀ H_L J v`` (positive semi-definite for convex
  losses such as cross-entropy). It splits ``loss_fn`` into the model's output
  and the loss of that output by calling ``loss_fn`` with a stand-in model that
  returns a given output, so ``loss_fn`` must call the model exactly once. The
  output may be a tensor or any nest of them torch's pytrees know (tuples,
  dicts, a Hugging Face ``ModelOutput``); its floating-point tensors are the
  outputs ``J`` differentiates. A loss that is linear in them (a model that
  computes its own loss, read as ``model(...).loss``) has no Gauss–Newton part:
  :class:`GGNUnavailableError`.

The model is evaluated in eval mode (dropout off), a deterministic stand-in for
the training-mode step, with the buffers recorded at that point (BatchNorm's
running statistics). Vectors are flat ``[B, n]`` tensors over the trainable
parameters in a fixed order (:class:`FlatParams`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.nn.attention import SDPBackend, sdpa_kernel

from stagecredit.call_site import warn

CURVATURES = ("hessian", "ggn")


class GGNUnavailableError(TypeError, ValueError):
    """The Gauss–Newton split does not apply: ``loss_fn`` does not call the model exactly once, the model has no
    differentiable output, or the loss is linear in it."""


class GGNFallbackWarning(UserWarning):
    """The default curvature fell back from the GGN to the Hessian (the message says why)."""


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
            raise GGNUnavailableError(
                f"curvature='ggn' needs loss_fn to call the model exactly once; it called it {len(outputs)} times")
        return outputs[0]


def _stand_in_loss(loss_fn: Callable, batch: Any, rebuild: Callable[[list], Any]) -> Callable[[list], torch.Tensor]:
    """The loss as a function of the model's differentiable outputs ``zs`` (``rebuild`` nests them as the model did)."""

    class StandIn(torch.nn.Module):
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, *args, **kwargs):
            return self.output

    def loss_of_outputs(zs: list) -> torch.Tensor:
        loss = loss_fn(StandIn(rebuild(zs)), batch)
        return loss.mean() if loss.ndim > 0 else loss

    return loss_of_outputs


@dataclasses.dataclass
class CurvatureChoice:
    """The curvature a series of products takes (one stage's): ``curvature``, or ``fallback`` from the first product
    whose GGN was unavailable on, so later products do not build the GGN's forward pass again only to fall back."""

    curvature: str
    fallback: Optional[str] = None

    def product(self, model: torch.nn.Module, loss_fn: Callable, batch: Any, params: Mapping[str, torch.Tensor],
                flat: FlatParams, buffers: Mapping[str, torch.Tensor] | None = None) -> Callable:
        """:func:`curvature_product` with this choice; a fallback it takes is kept for the products after it."""
        product = curvature_product(model, loss_fn, batch, params, flat, self.curvature, buffers=buffers,
                                    fallback=self.fallback)
        if product.curvature != self.curvature:
            self.curvature, self.fallback = product.curvature, None
        return product


def curvature_product(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: Any,
    params: Mapping[str, torch.Tensor],
    flat: FlatParams,
    curvature: str = "ggn",
    buffers: Mapping[str, torch.Tensor] | None = None,
    fallback: str | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V [B, n] ↦ C V [B, n]`` with ``C`` the Hessian or GGN of the mean loss on ``batch`` at ``params``.

    ``buffers``: the model's buffers at that point (e.g. BatchNorm's running
    statistics, which eval mode uses); without them the module's own are used.
    ``fallback``: the curvature to use, with a warning, where the GGN is
    unavailable (:class:`GGNUnavailableError`); without it the error is raised.

    The forward pass (and for the Hessian the gradient's graph) is built once;
    every call is reverse-mode passes over it, batched over the rows of ``V``.
    On small models, whose products are mostly per-call overhead, this takes
    about half the time of ``torch.func``'s forward-over-reverse transforms.
    The returned function's ``curvature`` attribute names the curvature taken.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
    try:
        return _product(model, loss_fn, batch, params, flat, curvature, buffers)
    except GGNUnavailableError as exc:
        if fallback is None or fallback == curvature:
            raise
        warn(f"{exc}; using curvature={fallback!r} instead", GGNFallbackWarning)
        return _product(model, loss_fn, batch, params, flat, fallback, buffers)


def _product(model, loss_fn, batch, params, flat: FlatParams, curvature: str, buffers) -> Callable:
    model.eval()
    leaves = [params[n].detach().clone().requires_grad_(True) for n in flat.names]
    prefixed = {f"model.{n}": t for n, t in zip(flat.names, leaves)}
    prefixed.update({f"model.{n}": t.detach().clone() for n, t in (buffers or {}).items()})
    # fused attention kernels have no second derivative; the math backend is made of ops that do
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        if curvature == "hessian":
            loss = functional_call(_LossOf(model, loss_fn, batch), prefixed, ())
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)

            def product(vectors: torch.Tensor) -> torch.Tensor:
                return _pull(grads, leaves, list(flat.unflatten(vectors).values()), flat, vectors)

        else:
            output = functional_call(_OutputOf(model, loss_fn, batch), prefixed, ())
            parts, spec = tree_flatten(output)
            where = [i for i, t in enumerate(parts) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not where:
                raise GGNUnavailableError(
                    f"curvature='ggn' needs the model to return a floating-point tensor that depends on the parameters "
                    f"(or a tuple, dict or ModelOutput holding one), got {type(output).__name__}")
            zs = [parts[i] for i in where]
            z_leaves = [z.detach().requires_grad_(True) for z in zs]

            def rebuild(values: list) -> Any:
                nested = [t.detach() if isinstance(t, torch.Tensor) else t for t in parts]
                for i, value in zip(where, values):
                    nested[i] = value
                return tree_unflatten(nested, spec)

            loss_grads = torch.autograd.grad(_stand_in_loss(loss_fn, batch, rebuild)(z_leaves), z_leaves,
                                             create_graph=True, allow_unused=True)
            # outputs the loss is linear in (a model's own loss, hidden states it ignores) have a zero row and
            # column in its Hessian: leave them out of J and Jᵀ
            curved = [i for i, g in enumerate(loss_grads) if g is not None and g.requires_grad]
            if not curved:
                raise GGNUnavailableError(
                    "curvature='ggn' found the loss linear in the model's outputs, so its Gauss–Newton matrix is zero: "
                    "does the model compute its own loss (read as model(...).loss, e.g. a Hugging Face model given "
                    "labels)? Compute the loss from the logits in loss_fn, or use curvature='hessian'")
            zs, z_leaves = [zs[i] for i in curved], [z_leaves[i] for i in curved]
            loss_grads = [loss_grads[i] for i in curved]
            # Jᵀu is linear in u, so differentiating it in u gives J v (the double-backward trick)
            us = [torch.zeros_like(z, requires_grad=True) for z in zs]
            transposed = torch.autograd.grad(zs, leaves, us, create_graph=True, allow_unused=True)

            def product(vectors: torch.Tensor) -> torch.Tensor:
                jv = _pull(transposed, us, list(flat.unflatten(vectors).values()), None, vectors)
                hjv = _pull(loss_grads, z_leaves, jv, None, vectors)
                return _pull(zs, leaves, hjv, flat, vectors)

    product.curvature = curvature
    return product


def _pull(outputs, inputs, cotangents, flat: FlatParams | None, vectors: torch.Tensor) -> torch.Tensor:
    """Batched ``Σᵢ cotangentᵢ · ∂outputᵢ/∂inputs`` (rows of the cotangents), flattened over ``inputs``.

    Outputs that do not depend on the inputs contribute zero; inputs they do not
    reach get zero rows. Without ``flat``: the list of per-input ``[B, *shape]`` pulls.
    """
    B = vectors.shape[0]
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
    if pairs:
        outs, cots = zip(*pairs)
        with torch.enable_grad():
            try:
                pulled = torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True,
                                             is_grads_batched=True)
            except RuntimeError:  # some ops have no batching rule: the same pulls one row at a time
                rows = [torch.autograd.grad(outs, inputs, [c[b] for c in cots], retain_graph=True, allow_unused=True)
                        for b in range(B)]
                pulled = [None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                          for i in range(len(inputs))]
    else:
        pulled = [None] * len(inputs)
    pulled = [torch.zeros(B, *x.shape, dtype=vectors.dtype) if g is None else g.detach()
              for g, x in zip(pulled, inputs)]
    if flat is None:
        return pulled
    return torch.cat([g.reshape(B, -1) for g in pulled], dim=1)
