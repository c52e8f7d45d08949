"""One shot of LLM Surgeon (the paper's Algorithm 1), written to be read: one device, one layer at a time.

Paper: van der Ouderaa et al., "The LLM Surgeon", ICLR 2024 (arXiv 2312.17244); section numbers below are the
paper's, the formulas those of docs/method.md §1 (its §3 maps the paper's sections to the code). Per prunable
linear with weight W (R×C, the bias as an extra last column), the Fisher block is F ≈ G ⊗ A; removing a set Q of
weights under ΔL = ½ΔθᵀFΔθ costs L_Q = ½ θ_Qᵀ([F⁻¹]_QQ)⁻¹θ_Q and is best compensated by
Δθ = −F⁻¹E_Q([F⁻¹]_QQ)⁻¹θ_Q, with F⁻¹ = G⁻¹ ⊗ A⁻¹.
Sections: §3.1 loss curvature (K-FAC), §3.2 costs, §3.3 global threshold, §3.4 correlated weight updates; the
multi-shot schedule (§3.5) repeats this shot at a linear sequence of target sizes (``schedule.py``).

Covers "llm-surgeon" on elements, N:M and rows/columns, without the first-order term. Coupled units (FFN units,
heads, kv groups) are in ``coupled.py``, the diagonal baselines (K-OBD, L-OBD, magnitude) in ``costs.py``;
``shot.prune_shot`` is the fast path (batched, distributed, memory-bounded) and gives the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import adapter_for, prunable_linears
from .costs import nm_groups
from .curvature import estimate_kfac
from .linalg import damped_inverse
from .methods import PruneOptions

__all__ = ["prune_shot_reference", "correlated_element_update", "row_chunks"]


def prune_shot_reference(model: nn.Module, windows: torch.Tensor, options: PruneOptions, target_size: float,
                         shot: int = 1) -> float:
    """Prune ``model`` in place to ``target_size`` (fraction of weights kept) in one shot; returns Σ L of removals."""
    opts, structure = options, options.structure_spec
    if opts.method != "llm-surgeon" or opts.first_order or structure.kind == "coupled":
        raise ValueError("the reference covers llm-surgeon without the first-order term on elements, N:M, rows/cols")
    if structure.kind == "structured" and opts.max_correlate:
        raise ValueError("the reference solves all removed rows (columns) of a layer jointly: max_correlate=0")
    adapter = adapter_for(model)
    linears = prunable_linears(model, adapter)
    # §3.1: K-FAC, A = E[a aᵀ] of the layer inputs, G = E[g gᵀ] of the output gradients, at the current weights
    factors = estimate_kfac(model, windows, adapter=adapter, fisher=opts.fisher, fisher_samples=opts.fisher_samples,
                            batch_size=opts.batch_size, autocast_dtype=opts.autocast_dtype,
                            gram_dtype=opts.gram_dtype, seed=opts.seed + shot, checkpoint_layers=opts.checkpoint_layers)
    n_remove = round((1.0 - target_size) * sum(lin.weight.numel() for lin in linears.values()))
    layers = []
    for name, lin in linears.items():
        W = lin.weight.detach().float()
        if lin.bias is not None:  # the bias is the last column of W; A carries the matching constant-1 input
            W = torch.cat([W, lin.bias.detach().float()[:, None]], dim=1)
        layers.append(dict(name=name, lin=lin, W=W, A=factors.input_factor(name), G=factors.output_factor(name)))
    if structure.kind == "structured":
        return _prune_rows_and_columns(layers, n_remove, opts)
    return _prune_elements(layers, n_remove, target_size, opts)


def _prune_elements(layers: list[dict], n_remove: int, target_size: float, opts: PruneOptions) -> float:
    structure = opts.structure_spec
    for layer in layers:
        C = layer["lin"].in_features
        # §3.1 damping, relative: Â⁻¹ = (A + λ_A·mean(diag A)·I)⁻¹, Ĝ⁻¹ likewise
        layer["A_inv"] = damped_inverse(layer["A"], opts.damping_a, dtype=opts.inverse_dtype)[0]
        layer["G_inv"] = damped_inverse(layer["G"], opts.damping_g, dtype=opts.inverse_dtype)[0]
        # §3.2, element q = (r, c): L_q = w_q² / (2 [F⁻¹]_qq), [F⁻¹]_qq = [G⁻¹]_rr [A⁻¹]_cc; the bias is not prunable
        F_inv_diag = torch.outer(torch.diagonal(layer["G_inv"]), torch.diagonal(layer["A_inv"]))
        L = (0.5 * layer["W"].square() / F_inv_diag)[:, :C]
        if structure.kind == "nm":  # §3.2, N:M: a group costs the summed L of its M−N cheapest weights
            L, layer["in_group"] = nm_groups(L, structure.n, structure.m)
        layer["L"] = L
    # §3.3: one global threshold: the k cheapest candidates of the whole model go (ties: layer, then row-major order)
    k = n_remove  # entries removed in earlier shots cost 0: removed again
    if structure.kind == "nm":  # the fraction of all groups that removes 1 − α of the weights
        k = round(min((1 - target_size) / (1 - structure.n / structure.m), 1.0) * sum(x["L"].numel() for x in layers))
    all_costs = torch.cat([layer["L"].flatten() for layer in layers])
    chosen = torch.zeros(all_costs.numel(), dtype=torch.bool)
    chosen[torch.argsort(all_costs, stable=True)[:k]] = True
    estimated, start = 0.0, 0
    for layer in layers:
        sel = chosen[start : start + layer["L"].numel()].view(layer["L"].shape)
        start += layer["L"].numel()
        estimated += float(layer["L"][sel].sum(dtype=torch.float64))
        # a chosen N:M group drops its M−N cheapest entries
        drop = sel if structure.kind != "nm" else layer["in_group"] & sel.repeat_interleave(structure.m, dim=1)
        _write(layer["lin"], correlated_element_update(layer["W"], drop, layer["G_inv"], layer["A_inv"],
                                                       opts.max_correlate))
    return estimated


def row_chunks(counts: list[int], max_correlate: int) -> list[list[int]]:
    """Rows with removals packed greedily, in order, into chunks of at most ``max_correlate`` removed entries (0: one
    chunk; a longer row is a chunk of its own)."""
    chunks, total = [[]], 0
    for row, n in enumerate(counts):
        if n == 0:
            continue
        if max_correlate > 0 and total and total + n > max_correlate:
            chunks, total = chunks + [[]], 0
        chunks[-1].append(row)
        total += n
    return [c for c in chunks if c]


def correlated_element_update(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor,
                              max_correlate: int) -> torch.Tensor:
    """§3.4, correlated update removing the entries Q = ``drop`` of W, chunk by chunk of whole rows, each chunk from
    the weights the previous ones updated: m = ([G⁻¹ ⊗ A⁻¹]_QQ)⁻¹ w_Q, ΔW = −Σ_q m_q G⁻¹[:, r_q] A⁻¹[c_q, :]."""
    W = W.clone()
    for rows in row_chunks(drop.sum(dim=1).tolist(), max_correlate):
        r_q, c_q = torch.nonzero(drop[rows], as_tuple=True)  # the entries Q of this chunk, row-major
        r_q = torch.tensor(rows)[r_q]
        F_inv_QQ = G_inv[r_q][:, r_q].double() * A_inv[c_q][:, c_q].double()  # [G⁻¹ ⊗ A⁻¹]_QQ
        m = torch.linalg.solve(F_inv_QQ, W[r_q, c_q].double())
        W -= ((G_inv[:, r_q].double() * m) @ A_inv[c_q, :].double()).to(W.dtype)
    W[:, : drop.shape[1]][drop] = 0  # removed entries end exactly zero
    return W


def _prune_rows_and_columns(layers: list[dict], n_remove: int, opts: PruneOptions) -> float:
    for layer in layers:
        W, A, G, C = layer["W"], layer["A"], layer["G"], layer["lin"].in_features
        # dead rows/columns (all zero, or no curvature) are always removed and left out of the sub-problem
        alive_rows = torch.nonzero((W.abs().sum(dim=1) > 0) & (torch.diagonal(G) > 0)).flatten()
        alive_cols = torch.nonzero((W[:, :C].abs().sum(dim=0) > 0) & (torch.diagonal(A)[:C] > 0)).flatten()
        cols = torch.cat([alive_cols, torch.tensor([C])]) if layer["lin"].bias is not None else alive_cols
        row_L, col_L = torch.full((W.shape[0],), float("-inf")), torch.full((C,), float("-inf"))
        layer.update(rows=alive_rows, cols=cols, weight_cols=alive_cols, row_L=row_L, col_L=col_L)
        if alive_rows.numel() == 0 or alive_cols.numel() == 0:
            continue
        W, A, G = W[alive_rows][:, cols], A[cols][:, cols], G[alive_rows][:, alive_rows]
        layer["A_inv"] = damped_inverse(A, opts.damping_a, dtype=opts.inverse_dtype)[0]  # §3.1, as above
        layer["G_inv"] = damped_inverse(G, opts.damping_g, dtype=opts.inverse_dtype)[0]
        layer["W_sub"] = W
        # §3.2, row r: L_r = w_rᵀ A w_r / (2 [G⁻¹]_rr); column c: L_c = w_cᵀ G w_c / (2 [A⁻¹]_cc) (bias not a column)
        row_L[alive_rows] = 0.5 * ((W @ A) * W).sum(dim=1) / torch.diagonal(layer["G_inv"])
        col_L[alive_cols] = (0.5 * ((G @ W) * W).sum(dim=0) / torch.diagonal(layer["A_inv"]))[: alive_cols.numel()]
    tau = _structured_threshold(layers, n_remove)
    estimated = 0.0
    for layer in layers:
        remove_rows, remove_cols = layer["row_L"] <= tau, layer["col_L"] <= tau
        for L, sel in ((layer["row_L"], remove_rows), (layer["col_L"], remove_cols)):
            estimated += float(L[sel & torch.isfinite(L)].sum())
        W = torch.zeros_like(layer["W"])
        if "W_sub" in layer:  # positions inside the sub-problem of the rows/columns removed now
            rows = torch.nonzero(remove_rows[layer["rows"]]).flatten()
            cols = torch.nonzero(remove_cols[layer["weight_cols"]]).flatten()
            W_sub = _remove_rows_and_columns(layer["W_sub"], rows, cols, layer["G_inv"], layer["A_inv"], opts)
            W[layer["rows"][:, None], layer["cols"][None, :]] = W_sub
        _write(layer["lin"], W)
    return estimated


def _structured_threshold(layers: list[dict], n_remove: int) -> float:
    """§3.3: the largest τ such that removing every row and column with L ≤ τ removes at most ``n_remove``
    parameters over all layers; r rows and c columns of an R×C matrix hold r·C + c·R − r·c of them."""
    R, C = [len(x["row_L"]) for x in layers], [len(x["col_L"]) for x in layers]
    r = [int(torch.isinf(x["row_L"]).sum()) for x in layers]  # dead rows/columns: cost −∞, always removed
    c = [int(torch.isinf(x["col_L"]).sum()) for x in layers]
    candidates = sorted((L, i, kind) for i, layer in enumerate(layers)
                        for kind in ("row", "col") for L in layer[f"{kind}_L"].tolist() if L > float("-inf"))
    tau, k = float("-inf"), 0
    while k < len(candidates):  # raise τ one distinct cost value at a time while the budget holds
        value = candidates[k][0]
        r_next, c_next = list(r), list(c)
        while k < len(candidates) and candidates[k][0] == value:
            _, i, kind = candidates[k]
            (r_next if kind == "row" else c_next)[i] += 1
            k += 1
        if sum(ri * Ci + ci * Ri - ri * ci for ri, ci, Ri, Ci in zip(r_next, c_next, R, C)) > n_remove:
            break
        tau, r, c = value, r_next, c_next
    return tau


def _remove_rows_and_columns(W: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, G_inv: torch.Tensor,
                             A_inv: torch.Tensor, opts: PruneOptions) -> torch.Tensor:
    """§3.4 for rows R and columns C of one layer, each set solved jointly (the other factor cancels):
    ΔW_R = −G⁻¹[:, R] (G⁻¹[R, R])⁻¹ W[R, :] and ΔW_C = −W[:, C] (A⁻¹[C, C])⁻¹ A⁻¹[C, :]."""
    def rows_update(W):
        return -(G_inv[:, rows].double() @ torch.linalg.solve(G_inv[rows][:, rows].double(), W[rows].double()))

    def cols_update(W):
        return -(torch.linalg.solve(A_inv[cols][:, cols].double(), W[:, cols].T.double()).T @ A_inv[cols].double())

    if opts.structured_update == "sum":  # both from the same W, summed (the form of the paper's code)
        W = W + (rows_update(W) + cols_update(W)).float()
    else:  # "sequential": the columns of the row-updated weights
        W = W + rows_update(W).float()
        W[rows] = 0
        W = W + cols_update(W).float()
    W[rows], W[:, cols] = 0, 0
    return W


@torch.no_grad()
def _write(lin: nn.Linear, W: torch.Tensor) -> None:
    lin.weight.copy_(W[:, : lin.in_features])
    if lin.bias is not None:
        lin.bias.copy_(W[:, lin.in_features])
