"""Correlated OBS weight updates in Kronecker form (paper Eq. 7-9; docs/method.md §1.4).

With F = G ⊗ A, removing the set Q of weights optimally under ½ Δθᵀ F Δθ gives
    ΔW = −G⁻¹ M A⁻¹,   M scatters m = ([G⁻¹ ⊗ A⁻¹]_{Q,Q})⁻¹ w_Q into the positions Q.
Whole rows R (or columns) reduce to one factor: ΔW = −G⁻¹[:, R] (G⁻¹[R, R])⁻¹ W[R, :] (the A's cancel).

``max_correlate`` bounds how many removed structures/entries are solved jointly: 0 = all at once; k > 0 =
chunks (whole rows packed greedily for elements) solved one after another, each from the weights already updated
by the previous chunks (Gauss-Seidel, the reference code's ``--addupdate``). Removed entries end exactly zero.
"""

from __future__ import annotations

import torch

__all__ = ["obs_update_rows", "obs_update_columns", "obs_update_elements", "quadratic_loss"]


def _solve_pd(C: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve C x = rhs for a (nearly) positive-definite C in float64, jittering the diagonal if needed."""
    C64, rhs64 = C.double(), rhs.double()
    jitter = 0.0
    scale = torch.diagonal(C64).abs().mean().clamp_min(1e-30)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(C64 + jitter * scale * torch.eye(C.shape[0], dtype=C64.dtype,
                                                                              device=C.device))
        if int(info) == 0:
            b = rhs64.unsqueeze(-1) if rhs64.dim() == 1 else rhs64
            x = torch.cholesky_solve(b, L)
            return x.squeeze(-1) if rhs64.dim() == 1 else x
        jitter = 1e-10 if jitter == 0 else jitter * 100
    raise FloatingPointError("OBS system is not positive definite")


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    if size <= 0 or idx.numel() <= size:
        return [idx]
    return list(idx.split(size))


def obs_update_rows(W: torch.Tensor, G_inv: torch.Tensor, rows: torch.Tensor, *, max_correlate: int = 0) -> torch.Tensor:
    """Remove ``rows`` of W (R, C') with the optimal update; returns the new W (rows exactly 0)."""
    W = W.clone()
    rows = rows.to(W.device)
    for R in _chunks(rows, max_correlate):
        X = _solve_pd(G_inv[R][:, R], W[R, :])  # (|R|, C') = (G⁻¹[R,R])⁻¹ W[R,:]
        W -= (G_inv[:, R].double() @ X).to(W.dtype)  # ΔW = −G⁻¹[:,R] (G⁻¹[R,R])⁻¹ W[R,:]
        W[R, :] = 0
    W[rows, :] = 0
    return W


def obs_update_columns(W: torch.Tensor, A_inv: torch.Tensor, cols: torch.Tensor, *, max_correlate: int = 0) -> torch.Tensor:
    """Remove ``cols`` of W (R, C') with the optimal update; returns the new W (columns exactly 0)."""
    W = W.clone()
    cols = cols.to(W.device)
    for Cs in _chunks(cols, max_correlate):
        X = _solve_pd(A_inv[Cs][:, Cs], W[:, Cs].T)  # (|Cs|, R) = (A⁻¹[Cs,Cs])⁻¹ W[:,Cs]ᵀ
        W -= (X.T @ A_inv[Cs, :].double()).to(W.dtype)  # ΔW = −W[:,Cs] (A⁻¹[Cs,Cs])⁻¹ A⁻¹[Cs,:]
        W[:, Cs] = 0
    W[:, cols] = 0
    return W


def _row_chunks(counts: torch.Tensor, max_correlate: int) -> list[torch.Tensor]:
    """Greedily pack rows (in order) into chunks of at most ``max_correlate`` removed entries."""
    rows = torch.nonzero(counts > 0).flatten()
    if max_correlate <= 0:
        return [rows]
    chunks, current, total = [], [], 0
    for r, c in zip(rows.tolist(), counts[rows].tolist()):
        if current and total + c > max_correlate:
            chunks.append(current)
            current, total = [], 0
        current.append(r)
        total += c
    if current:
        chunks.append(current)
    return [torch.tensor(c, dtype=torch.long, device=counts.device) for c in chunks]


def obs_update_elements(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                        max_correlate: int = 2000) -> torch.Tensor:
    """Remove the entries ``drop`` (R, C) — weight columns only, W may carry a bias column — with correlated OBS.

    For each chunk of rows S with entries Q: C = G⁻¹[r_q, r_q'] · A⁻¹[c_q, c_q'] (Hadamard form of the
    Kronecker block), m = C⁻¹ w_Q, ΔW = −G⁻¹[:, S] (M_S A⁻¹). Entries already zero are included (cost 0), so
    they stay zero.
    """
    W = W.clone()
    R, C = drop.shape
    counts = drop.sum(dim=1)
    for S in _row_chunks(counts, max_correlate):
        sub = drop[S]  # (|S|, C)
        r_local, c = torch.nonzero(sub, as_tuple=True)
        r = S[r_local]
        Cmat = G_inv[r][:, r] * A_inv[c][:, c]  # (q, q)
        m = _solve_pd(Cmat, W[r, c])  # (q,)
        M = torch.zeros(S.numel(), W.shape[1], dtype=torch.float64, device=W.device)
        M[r_local, c] = m
        dW = G_inv[:, S].double() @ (M @ A_inv.double())  # (R, C')
        W -= dW.to(W.dtype)
        W[r, c] = 0
    W[:, :C][drop] = 0
    return W


def quadratic_loss(dW: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(G ΔW A ΔWᵀ) — the loss increase the costs model."""
    return 0.5 * torch.trace(G @ dW @ A @ dW.T)
