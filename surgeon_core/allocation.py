"""Global allocation: one threshold over every prunable layer per shot (paper §3.3, dynamic weight allocation).

Layers end up with different sparsities, chosen by cost. Counts are exact: ties at the threshold are broken
deterministically (first in layer order, then in memory order), which matters for 4-bit de-quantized weights where
many costs are equal.
"""

from __future__ import annotations

import torch

__all__ = ["select_elements", "select_groups", "select_structures", "structured_removed", "uniform_elements"]


def _order_keys(c: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values (negative floats get their magnitude bits flipped)."""
    x = c.detach().reshape(-1).float().contiguous().view(torch.int32)
    return x ^ ((x >> 31) & 0x7FFFFFFF)


def _exact_lowest(costs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks marking exactly the ``k`` lowest costs across all tensors, each mask on its tensor's device.

    A two-pass radix select on order-preserving int32 keys (a 65536-bin histogram of the high 16 bits, then of the
    low 16 bits inside the chosen bin): no concatenation and no sort, so a 7B model's 6.5 G element costs are
    selected where they lie (on the GPU) with a few histogram passes and one bool mask per layer.
    """
    k = int(max(0, min(k, sum(c.numel() for c in costs))))
    if k == 0:
        return [torch.zeros_like(c, dtype=torch.bool) for c in costs]
    for c in costs:
        if torch.isnan(c).any():
            raise ValueError("a removal cost is NaN: the curvature factors are not positive definite (raise the "
                             "damping) or the weights hold NaN")
    bins = 1 << 16

    def high(key):  # 0..65535, in key order
        return (key >> 16) + (bins // 2)

    def histogram(per_tensor) -> torch.Tensor:  # summed where the first tensor lies; one transfer at the end
        total = None
        for c in costs:
            h = per_tensor(_order_keys(c))
            total = h if total is None else total.add_(h.to(total.device))
        return total.cpu()

    cum = histogram(lambda key: torch.bincount(high(key), minlength=bins)).cumsum(0)
    hi = int(torch.searchsorted(cum, k))  # first bin whose cumulative count reaches k
    below = int(cum[hi - 1]) if hi > 0 else 0
    hist = histogram(lambda key: torch.bincount(key[high(key) == hi] & 0xFFFF, minlength=bins))
    lo = int(torch.searchsorted(hist.cumsum(0), k - below))
    tau = ((hi - bins // 2) << 16) | lo  # the key of the k-th smallest cost
    out, need = [], k
    for c in costs:
        key = _order_keys(c)
        chosen = key < tau
        need -= int(chosen.sum())
        out.append(chosen)
    for c, chosen in zip(costs, out):  # ties at tau: the first `need` of them, in layer then memory order
        if need <= 0:
            break
        ties = torch.nonzero(_order_keys(c) == tau).flatten()[:need]
        chosen[ties] = True
        need -= ties.numel()
    return [m.view(c.shape) for m, c in zip(out, costs)]


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
