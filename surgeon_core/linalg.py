"""Damped positive-definite inverses and solves: the one place that damps a matrix and escalates the damping.

Policy: M + λ·mean(diag M)·I with λ = the caller's fraction; after a failed Cholesky λ ← max(10λ, 1e-8), up to 1e4.

Users: the K-FAC factors' inverses (``damped_inverse``, the paper's relative damping), the OBS systems of the
updates and of the coupled costs (``solve_spd``, λ = 0 first: exact unless rounding broke positive definiteness),
SparseGPT's inverse Hessian (``damped_inverse_cholesky``) and the curvature check (``is_positive_definite``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["FLOOR", "GROWTH", "MAX_DAMPING", "damp", "escalate", "damped_inverse", "damped_inverse_cholesky",
           "solve_spd", "is_positive_definite", "cholesky_solve", "triangular_cholesky_solve"]

FLOOR, GROWTH, MAX_DAMPING = 1e-8, 10.0, 1e4


def _mean_diagonal(M: torch.Tensor) -> torch.Tensor:
    """mean(diag M), per matrix of a batch (..., n, n) -> (...); NaN/Inf refused."""
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    d = diag.mean() if M.dim() == 2 else diag.mean(-1)
    if not bool(torch.isfinite(d).all()):
        raise FloatingPointError("matrix contains NaN/Inf")
    return d.clamp_min(1e-30)


def damp(M: torch.Tensor, frac: float) -> torch.Tensor:
    """M + frac·mean(diag M)·I, a new tensor (batched over leading dimensions)."""
    damped = M.clone()
    if frac:
        damped.diagonal(dim1=-2, dim2=-1).add_(frac * _mean_diagonal(M)[..., None])
    return damped


def escalate(M: torch.Tensor, frac: float, factorize: Callable[[torch.Tensor], object | None], *,
             overwrite: bool = False, what: str = "matrix") -> tuple[object, float]:
    """``factorize(damped M)`` with the module's damping policy; returns (its first non-None result, λ used).

    ``overwrite``: damp M itself, in place (its memory is reused; M holds the last damping tried afterwards)."""
    d = _mean_diagonal(M)[..., None]
    used, applied = frac, 0.0
    while True:
        if overwrite:
            damped = M
            if used != applied:
                damped.diagonal(dim1=-2, dim2=-1).add_((used - applied) * d)
                applied = used
        elif used:
            damped = M.clone()
            damped.diagonal(dim1=-2, dim2=-1).add_(used * d)
        else:
            damped = M
        result = factorize(damped)
        del damped
        if result is not None:
            return result, used
        if used >= MAX_DAMPING:
            raise FloatingPointError(f"{what} could not be made positive definite (damping up to {used:g})")
        used = max(used * GROWTH, FLOOR)


def damped_inverse(M: torch.Tensor, frac: float, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """(M + λ·mean(diag M)·I)⁻¹ through a Cholesky in ``dtype``, returned in fp32, and the λ used (≥ ``frac``).

    float64 is the paper's code's precision; float32 is faster on a CPU and close for well-conditioned factors."""
    def inverse(damped: torch.Tensor) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            return None
        inv = torch.cholesky_inverse(L)
        return inv.float() if bool(torch.isfinite(inv).all()) else None

    return escalate(M.to(dtype), frac, inverse, what="curvature factor")


def damped_inverse_cholesky(H: torch.Tensor, frac: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹ (U ᵀU = the inverse); H is damped in place."""
    def upper(damped: torch.Tensor) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            return None
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        return U if int(info) == 0 and bool(torch.isfinite(U).all()) else None

    return escalate(H, frac, upper, overwrite=True, what="Hessian")[0]


def solve_spd(C: torch.Tensor, rhs: torch.Tensor, *, triangular: bool = False) -> torch.Tensor:
    """x = C⁻¹ rhs in float64 for symmetric positive definite C (n, n) or a batch (B, n, n); rhs (..., n) or
    (..., n, k). Undamped first; a batch whose Cholesky fails is damped as a whole. ``triangular``: solve with
    :func:`cholesky_solve` (the batched element update's solver) instead of ``torch.cholesky_solve``."""
    C64, rhs64 = C.double(), rhs.double()
    vector = rhs64.dim() == C64.dim() - 1
    b = rhs64.unsqueeze(-1) if vector else rhs64

    def solve(damped: torch.Tensor) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info.max()) != 0:
            return None
        return cholesky_solve(b, L) if triangular else torch.cholesky_solve(b, L)

    x = escalate(C64, 0.0, solve, what="OBS system")[0]
    return x.squeeze(-1) if vector else x


def is_positive_definite(M: torch.Tensor, frac: float) -> bool:
    """Whether M + frac·mean(diag M)·I has a float64 Cholesky factor (no escalation)."""
    return int(torch.linalg.cholesky_ex(damp(M.double(), frac))[1]) == 0


def cholesky_solve(b: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """x = (L Lᵀ)⁻¹ b for lower Cholesky factors L (..., n, n) and right-hand sides b (..., n, k): two batched
    triangular solves, faster on GPUs than ``torch.cholesky_solve`` for batches of small systems."""
    if not TRIANGULAR_SOLVES:
        return torch.cholesky_solve(b, L)
    return triangular_cholesky_solve(b, L)


def triangular_cholesky_solve(b: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The two triangular solves of :func:`cholesky_solve`: L y = b, then Lᵀ x = y."""
    y = torch.linalg.solve_triangular(L, b, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


TRIANGULAR_SOLVES = True  # False: torch.cholesky_solve
