"""Lanczos for functions of a symmetric operator applied to a batch of vectors.

``f(A) v ≈ ‖v‖ Q U f(Θ) Uᵀ e₁`` where ``Q`` spans the Krylov space of ``v``
and ``T = U Θ Uᵀ`` is the Lanczos tridiagonal matrix. It needs ``m``
operator products per vector and is exact once ``m`` reaches the number of
distinct eigenvalues ``v`` touches.
"""

from __future__ import annotations

from typing import Callable

import torch


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor, steps: int):
    """Batched Lanczos with full re-orthogonalisation.

    Returns ``(norms [B], Q [B, m, n], T [B, m, m])``; a vector whose Krylov space
    is exhausted early gets zero basis vectors beyond it (they do not touch e₁).
    """
    B, n = vectors.shape
    m = max(1, min(steps, n))
    dtype = vectors.dtype
    norms = vectors.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    Q = torch.zeros(B, m, n, dtype=dtype)
    alpha = torch.zeros(B, m, dtype=torch.float64)
    beta = torch.zeros(B, m, dtype=torch.float64)
    q = vectors / safe[:, None]
    q[norms == 0] = 0
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for j in range(m):
        Q[:, j] = q
        w = matvec(q)
        alpha[:, j] = (w * q).sum(dim=1).double()
        size = w.norm(dim=1)
        # full re-orthogonalisation against every basis vector so far (twice is enough)
        for _ in range(2):
            coeffs = torch.einsum("bkn,bn->bk", Q[:, : j + 1], w)
            w = w - torch.einsum("bk,bkn->bn", coeffs, Q[:, : j + 1])
        if j + 1 < m:
            b = w.norm(dim=1)
            alive = b > tol * size  # otherwise the Krylov space is exhausted: stop this vector's basis
            beta[:, j] = torch.where(alive, b, torch.zeros_like(b)).double()
            q = torch.where(alive[:, None], w / torch.where(alive, b, torch.ones_like(b))[:, None], torch.zeros_like(w))
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    return norms, Q, T


def krylov_function_apply(norms: torch.Tensor, Q: torch.Tensor, T: torch.Tensor,
                          scalar_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``f(A) v`` for every vector given ``scalar_fn(ritz_values [B, m]) -> f [B, m]``."""
    return krylov_functions_apply(norms, Q, T, lambda theta: (scalar_fn(theta),))[0]


def krylov_functions_apply(norms: torch.Tensor, Q: torch.Tensor, T: torch.Tensor,
                           scalar_fns: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """``[f₁(A) v, f₂(A) v, …]`` from one eigendecomposition, ``scalar_fns(ritz) -> (f₁, f₂, …)``."""
    theta, U = torch.linalg.eigh(T)  # [B, m], [B, m, m]
    out = []
    for f in scalar_fns(theta):
        coeffs = U @ (f * U[:, 0, :]).unsqueeze(-1)  # [B, m, 1] = U f(Θ) Uᵀ e1
        out.append(norms[:, None] * torch.einsum("bm,bmn->bn", coeffs.squeeze(-1).to(Q.dtype), Q))
    return out
