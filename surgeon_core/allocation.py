"""Global allocation: one threshold over every prunable layer per shot (docs/method.md §1.5).

Layers end up with different sparsities, chosen by cost. Counts are exact: ties at the threshold are broken
deterministically (first in layer order, then in memory order), which matters for 4-bit de-quantized weights where
many costs are equal.
"""

from __future__ import annotations

import torch

__all__ = ["select_elements", "select_groups", "select_structures", "structured_removed", "uniform_elements"]


def _exact_lowest(costs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks marking exactly the ``k`` lowest costs across all tensors."""
    flat = torch.cat([c.reshape(-1).float().cpu() for c in costs])
    k = int(max(0, min(k, flat.numel())))
    if k == 0:
        return [torch.zeros_like(c, dtype=torch.bool) for c in costs]
    tau = torch.kthvalue(flat, k).values  # the k-th smallest
    chosen = flat < tau
    need = k - int(chosen.sum())
    if need > 0:  # ties at tau: take the first `need` of them
        ties = torch.nonzero(flat == tau).flatten()[:need]
        chosen[ties] = True
    out, start = [], 0
    for c in costs:
        out.append(chosen[start : start + c.numel()].view(c.shape).to(c.device))
        start += c.numel()
    return out


def select_elements(costs: list[torch.Tensor], n_remove: int) -> list[torch.Tensor]:
    """Unstructured: the ``n_remove`` cheapest weights over all layers (entries already zero cost 0)."""
    return _exact_lowest(costs, n_remove)


def uniform_elements(costs: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Per-layer uniform allocation: the cheapest ``fraction`` of each layer."""
    return [_exact_lowest([c], round(fraction * c.numel()))[0] for c in costs]


def select_groups(group_costs: list[torch.Tensor], n_groups: int) -> list[torch.Tensor]:
    """N:M: the ``n_groups`` cheapest groups over all layers."""
    return _exact_lowest(group_costs, n_groups)


def structured_removed(r: torch.Tensor, c: torch.Tensor, R: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Parameters removed by r rows and c columns of an R×C matrix: r·C + c·R − r·c (overlap counted once)."""
    return r * C + c * R - r * c


def select_structures(row_costs: list[torch.Tensor], col_costs: list[torch.Tensor], n_remove: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows and columns: the largest threshold τ whose removed parameters (summed over layers) stay ≤ n_remove.

    Dead rows/columns are passed with cost −inf and are always removed. Returns per-layer boolean row and column
    masks.
    """
    rows = [r.float().cpu() for r in row_costs]
    cols = [c.float().cpu() for c in col_costs]
    R = torch.tensor([r.numel() for r in rows], dtype=torch.float64)
    C = torch.tensor([c.numel() for c in cols], dtype=torch.float64)
    rows_sorted = [r.sort().values for r in rows]
    cols_sorted = [c.sort().values for c in cols]

    def removed(tau: torch.Tensor) -> float:
        r = torch.tensor([float(torch.searchsorted(s, tau, right=True)) for s in rows_sorted], dtype=torch.float64)
        c = torch.tensor([float(torch.searchsorted(s, tau, right=True)) for s in cols_sorted], dtype=torch.float64)
        return float(structured_removed(r, c, R, C).sum())

    candidates = torch.cat([s for s in rows_sorted + cols_sorted])
    candidates = candidates[torch.isfinite(candidates)].unique()  # sorted ascending
    lo, hi = -1, candidates.numel() - 1  # invariant: removed(candidates[lo]) <= n_remove (lo=-1: dead only)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if removed(candidates[mid]) <= n_remove:
            lo = mid
        else:
            hi = mid - 1
    tau = candidates[lo] if lo >= 0 else torch.tensor(float("-inf"))
    return [r <= tau for r in rows], [c <= tau for c in cols]
