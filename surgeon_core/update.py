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

__all__ = ["obs_update_rows", "obs_update_columns", "obs_update_elements", "obs_update_elements_batched",
           "newton_step", "quadratic_loss"]


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


def _row_chunks(counts: torch.Tensor, max_correlate: int) -> torch.Tensor:
    """Chunk id of every row: rows with removals are packed greedily, in order, into chunks of at most
    ``max_correlate`` removed entries (a longer row is a chunk of its own); rows without removals get -1."""
    chunk_of = torch.full((counts.numel(),), -1, dtype=torch.long)
    chunk, total = 0, 0
    for r, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        if max_correlate > 0 and total and total + c > max_correlate:
            chunk, total = chunk + 1, 0
        chunk_of[r] = chunk
        total += c
    return chunk_of


def _chunk_entries(drop: torch.Tensor, max_correlate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (n_chunks, Q) row and column indices of the removed entries of each chunk (-1 = padding)."""
    r, c = torch.nonzero(drop.cpu(), as_tuple=True)
    if r.numel() == 0:
        return torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long)
    chunk = _row_chunks(drop.sum(dim=1).cpu(), max_correlate)[r]  # entries are sorted by row, so by chunk
    n_chunks = int(chunk.max()) + 1
    sizes = torch.bincount(chunk, minlength=n_chunks)
    starts = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(r.numel()) - starts[chunk]
    Q = int(sizes.max())
    R_idx = torch.full((n_chunks, Q), -1, dtype=torch.long)
    C_idx = torch.full((n_chunks, Q), -1, dtype=torch.long)
    R_idx[chunk, pos] = r
    C_idx[chunk, pos] = c
    return R_idx, C_idx


def obs_update_elements_batched(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                                max_correlate: int = 2000) -> torch.Tensor:
    """:func:`obs_update_elements` for a batch of B independent layers of one shape (GPU-friendly).

    W (B, R, C'), drop (B, R, C), G_inv (B, R, R), A_inv (B, C', C'). Chunk j of every layer is solved in one
    batched Cholesky; within a layer the chunks stay sequential (Gauss-Seidel).
    """
    B, R, Cp = W.shape
    dev = W.device
    per_layer = [_chunk_entries(drop[b], max_correlate) for b in range(B)]
    steps = max(p[0].shape[0] for p in per_layer)
    Q = max(p[0].shape[1] for p in per_layer)
    R_idx = torch.full((B, steps, Q), -1, dtype=torch.long)
    C_idx = torch.full((B, steps, Q), -1, dtype=torch.long)
    for b, (ri, ci) in enumerate(per_layer):
        R_idx[b, : ri.shape[0], : ri.shape[1]] = ri
        C_idx[b, : ci.shape[0], : ci.shape[1]] = ci
    R_idx, C_idx = R_idx.to(dev), C_idx.to(dev)
    W = W.clone()
    W_flat = torch.cat([W.reshape(B, R * Cp), torch.zeros(B, 1, device=dev, dtype=W.dtype)], dim=1)
    b_ix = torch.arange(B, device=dev)
    eye = torch.eye(Q, device=dev, dtype=torch.float64)
    for j in range(steps):
        valid = R_idx[:, j] >= 0  # (B, Q)
        if not valid.any():
            continue
        r = R_idx[:, j].clamp_min(0)
        c = C_idx[:, j].clamp_min(0)
        pair = valid[:, :, None] & valid[:, None, :]
        # C = [G⁻¹ ⊗ A⁻¹]_{Q,Q} = G⁻¹[r_q, r_q'] · A⁻¹[c_q, c_q']   (B, Q, Q)
        Cmat = (G_inv[b_ix[:, None, None], r[:, :, None], r[:, None, :]].double()
                * A_inv[b_ix[:, None, None], c[:, :, None], c[:, None, :]].double())
        Cmat = torch.where(pair, Cmat, eye)
        w_Q = torch.where(valid, W_flat.gather(1, r * Cp + c), 0).double()  # (B, Q)
        m = _solve_pd_batched(Cmat, w_Q).to(W.dtype)  # (B, Q)
        # ΔW = −G⁻¹ M A⁻¹ = −Σ_q m_q G⁻¹[:, r_q] A⁻¹[c_q, :]
        Gcols = torch.gather(G_inv, 2, r[:, None, :].expand(B, R, Q)) * m[:, None, :]  # (B, R, Q)
        Arows = torch.gather(A_inv, 1, c[:, :, None].expand(B, Q, Cp))  # (B, Q, C')
        W_flat[:, : R * Cp] -= torch.bmm(Gcols, Arows).reshape(B, R * Cp)
        dummy = torch.full_like(r, R * Cp)
        W_flat.scatter_(1, torch.where(valid, r * Cp + c, dummy), 0.0)
    W = W_flat[:, : R * Cp].reshape(B, R, Cp)
    W[:, :, : drop.shape[2]][drop] = 0
    return W


def _solve_pd_batched(C: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched C x = rhs for positive-definite C (B, Q, Q) in float64, with diagonal jitter on failure."""
    jitter = 0.0
    scale = torch.diagonal(C, dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(C + jitter * scale * eye)
        if int(info.max()) == 0:
            return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        jitter = 1e-10 if jitter == 0 else jitter * 100
    raise FloatingPointError("OBS system is not positive definite")


def obs_update_elements(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                        max_correlate: int = 2000) -> torch.Tensor:
    """Remove the entries ``drop`` (R, C) — weight columns only, W may carry a bias column — with correlated OBS.

    For each chunk of rows S with entries Q: C = G⁻¹[r_q, r_q'] · A⁻¹[c_q, c_q'] (Hadamard form of the
    Kronecker block), m = C⁻¹ w_Q, ΔW = −G⁻¹ M A⁻¹ with M holding m at Q. Entries already zero are included
    (cost 0), so they stay zero.
    """
    return obs_update_elements_batched(W[None], drop[None], G_inv[None], A_inv[None],
                                       max_correlate=max_correlate)[0]


def newton_step(grad: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor) -> torch.Tensor:
    """U = G⁻¹ ∇W A⁻¹ = F⁻¹g in matrix form: the minimiser of gᵀΔθ + ½ΔθᵀFΔθ is ΔW = −U.

    First-order OBS (docs/method.md, "Fine-tuning and the first-order term"): removing K under the model with a
    gradient is plain OBS applied to W' = W − U, i.e. costs and updates at the Newton point, plus the step −U.
    """
    return G_inv @ grad @ A_inv


def quadratic_loss(dW: torch.Tensor, A: torch.Tensor, G: torch.Tensor, grad: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(G ΔW A ΔWᵀ) — the loss increase the costs model; with ``grad`` the
    first-order term ⟨∇W, ΔW⟩ is added."""
    q = 0.5 * torch.trace(G @ dW @ A @ dW.T)
    return q if grad is None else q + (grad * dW).sum()
