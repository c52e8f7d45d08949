"""Removal costs per structure under F ≈ G ⊗ A (paper §3.2; docs/method.md §1.3).

All functions take one layer's (augmented) weight W (R, C') — the bias, if any, is the last column — and its
factors, and return new tensors. ``kind`` selects the curvature model:

- ``"obs"``        LLM Surgeon: OBS costs with the damped inverse factors (the optimal correlated update assumed),
- ``"kfac-diag"``  K-OBD: diagonal of G ⊗ A, no update,
- ``"activations"`` L-OBD: G = I, diagonal of A, no update,
- ``"identity"``   magnitude.

Numerators use the undamped factors, denominators the damped inverses, as the paper's code does.
"""

from __future__ import annotations

import torch

__all__ = [
    "CURVATURE_KINDS",
    "element_costs",
    "row_costs",
    "column_costs",
    "nm_groups",
]

CURVATURE_KINDS = ("obs", "kfac-diag", "activations", "identity")


def _check_kind(kind: str) -> None:
    if kind not in CURVATURE_KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}; expected one of {CURVATURE_KINDS}")


def element_costs(W: torch.Tensor, *, kind: str, A: torch.Tensor | None = None, G: torch.Tensor | None = None,
                  A_inv: torch.Tensor | None = None, G_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Cost of removing each single weight, (R, C') like W."""
    _check_kind(kind)
    W2 = W.square()  # (R, C')
    if kind == "obs":  # ½ W_rc² / ([G⁻¹]_rr [A⁻¹]_cc)
        return 0.5 * W2 / torch.outer(torch.diagonal(G_inv), torch.diagonal(A_inv))
    if kind == "kfac-diag":  # ½ W_rc² G_rr A_cc
        return 0.5 * W2 * torch.outer(torch.diagonal(G), torch.diagonal(A))
    if kind == "activations":  # ½ W_rc² A_cc
        return 0.5 * W2 * torch.diagonal(A)[None, :]
    return 0.5 * W2


def row_costs(W: torch.Tensor, *, kind: str, A: torch.Tensor | None = None, G: torch.Tensor | None = None,
              G_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Cost of removing each whole row (output feature, with its bias), shape (R,)."""
    _check_kind(kind)
    if kind == "identity":
        return W.norm(dim=1)
    if kind == "activations":  # ½ Σ_c W_rc² A_cc
        return 0.5 * (W.square() * torch.diagonal(A)[None, :]).sum(dim=1)
    wAw = ((W @ A) * W).sum(dim=1)  # w_rᵀ A w_r, (R,)
    if kind == "obs":
        return 0.5 * wAw / torch.diagonal(G_inv)
    return 0.5 * torch.diagonal(G) * wAw


def column_costs(W: torch.Tensor, *, kind: str, A: torch.Tensor | None = None, G: torch.Tensor | None = None,
                 A_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Cost of removing each whole column (input feature), shape (C',); the caller ignores the bias column."""
    _check_kind(kind)
    if kind == "identity":
        return W.norm(dim=0)
    if kind == "activations":  # ½ A_cc Σ_r W_rc²
        return 0.5 * torch.diagonal(A) * W.square().sum(dim=0)
    wGw = ((G @ W) * W).sum(dim=0)  # w_cᵀ G w_c, (C',)
    if kind == "obs":
        return 0.5 * wGw / torch.diagonal(A_inv)
    return 0.5 * torch.diagonal(A) * wGw


def nm_groups(costs: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M groups along the input dimension of element ``costs`` (R, C) (weight columns only, no bias).

    Every group of ``m`` consecutive inputs keeps ``n`` weights. Returns ``(group_costs (R, C/m),
    drop (R, C) bool)``: the cost of pruning a group is the sum of its ``m - n`` cheapest element costs
    (independence assumed, as in the paper), and ``drop`` marks those entries (ties: the lower index first). The
    one N:M grouping of the package: LLM Surgeon's costs and the layer-wise baselines' scores alike.
    """
    R, C = costs.shape
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if C % m:
        raise ValueError(f"input dimension {C} is not divisible by M={m} for {n}:{m} sparsity")
    grouped = costs.reshape(R, C // m, m)
    order = grouped.argsort(dim=-1, stable=True)[..., : m - n]  # the m-n cheapest per group
    drop = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True)
    group_costs = torch.gather(grouped, -1, order).sum(dim=-1)
    return group_costs, drop.reshape(R, C)
