"""One linear's sub-problem in a shot: its working weight, damped inverse factors and removal costs (elements, N:M
groups, or rows and columns), and the removal of what the global threshold selected, with the OBS update.

The working weight is the layer's weight with the bias, if any, as its last column (fp32). For rows and columns the
sub-problem leaves out dead rows/columns (all zero, or zero curvature: cost −∞, always removed) and uses the
principal sub-matrices of A and G.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .costs import column_costs, element_costs, nm_groups, row_costs
from .curvature import KFACFactors
from .linalg import damped_inverse
from .update import newton_step, obs_update_columns, obs_update_elements_concurrent, obs_update_rows

__all__ = ["LayerProblem", "augmented", "write_back", "prepare_layer", "apply_structured", "element_drop",
           "apply_elements_grouped"]


@dataclass
class LayerProblem:
    name: str
    lin: nn.Linear
    W: torch.Tensor | None  # (R, C') working weight (the sub-problem's, for rows/columns)
    rows: torch.Tensor | None = None  # alive row indices (rows/columns)
    cols: torch.Tensor | None = None  # alive column indices incl. the bias column (rows/columns)
    n_weight_cols: int = 0  # alive weight columns in the sub-problem
    A_inv: torch.Tensor | None = None
    G_inv: torch.Tensor | None = None
    costs: torch.Tensor | None = None  # element costs (R, C), or N:M group costs (R, C/M)
    row_cost: torch.Tensor | None = None
    col_cost: torch.Tensor | None = None
    nm_drop: torch.Tensor | None = None  # the M−N cheapest entries of every N:M group
    extra_gain: float = 0.0  # first-order term: predicted loss change of the Newton step alone (≤ 0)


def augmented(lin: nn.Linear, device) -> torch.Tensor:
    """The weight (R, C) in fp32 on ``device``, with the bias as an extra last column (R, C+1) if there is one."""
    W = lin.weight.detach().to(device=device, dtype=torch.float32)
    if lin.bias is None:
        return W
    return torch.cat([W, lin.bias.detach().to(device=device, dtype=torch.float32)[:, None]], dim=1)


@torch.no_grad()
def write_back(lin: nn.Linear, W_aug: torch.Tensor) -> None:
    """Store an augmented weight into the linear (weight and bias), refusing NaN/Inf."""
    C = lin.in_features
    if not torch.isfinite(W_aug).all():
        raise FloatingPointError("pruning produced NaN/Inf weights")
    lin.weight.copy_(W_aug[:, :C].to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(W_aug[:, C].to(lin.bias.dtype))


def factors_for(factors: KFACFactors | None, name: str, W: torch.Tensor, device):
    """(A, G) of one linear on ``device`` in fp32 (whatever their storage dtype); G = I where none was collected;
    (None, None) without curvature."""
    if factors is None:
        return None, None
    A = factors.input_factor(name).to(device)
    G = factors.output_factor(name)
    G = G.to(device) if G is not None else torch.eye(W.shape[0], device=device)
    return A, G


def prepare_layer(name: str, lin: nn.Linear, factors: KFACFactors | None, opts, device, cache: dict
                  ) -> tuple[LayerProblem, int]:
    """Costs of one linear at its current weights; returns the sub-problem and its damping escalations.

    ``cache`` holds the damped inverse of the input factor shared by q/k/v or gate/up (the caller empties it when
    the next linear reads another input)."""
    spec = opts.spec
    W = augmented(lin, device)
    A, G = factors_for(factors, name, W, device)
    if spec.curvature == "activations":
        G = None
    grad = None  # the first-order term: the scaled mean loss gradient s·∇W (R, C')
    if opts.first_order and factors is not None and name in factors.grads:
        grad = factors.grads[name].to(device) * opts.first_order_scale
    a_key = factors.group_of[name] if factors is not None else name
    prepare = _prepare_structured if opts.structure_spec.kind == "structured" else _prepare_elements
    return prepare(name, lin, W, A, G, opts, spec, device, a_key, cache, grad=grad)


def _inverses(A, G, opts, cache: dict, key) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A⁻¹, G⁻¹, escalations) of the damped factors; A⁻¹ comes from ``cache[key]`` when already made."""
    G_inv, used_g = damped_inverse(G, opts.damping_g, dtype=opts.inverse_dtype)
    if key not in cache:
        cache[key] = damped_inverse(A, opts.damping_a, dtype=opts.inverse_dtype)
    A_inv, used_a = cache[key]
    return A_inv, G_inv, int(used_g != opts.damping_g) + int(used_a != opts.damping_a)


def _prepare_structured(name, lin, W, A, G, opts, spec, device, a_key, cache, grad=None
                        ) -> tuple[LayerProblem, int]:
    C = lin.in_features
    alive_r = W.abs().sum(dim=1) > 0
    alive_c = W[:, :C].abs().sum(dim=0) > 0
    if A is not None:
        alive_c &= torch.diagonal(A)[:C] > 0
    if G is not None and spec.curvature == "kfac":
        alive_r &= torch.diagonal(G) > 0
    rows = torch.nonzero(alive_r).flatten()
    wcols = torch.nonzero(alive_c).flatten()
    cols = torch.cat([wcols, torch.tensor([C], device=device)]) if lin.bias is not None else wcols
    Wsub = W[rows][:, cols]
    layer = LayerProblem(name, lin, Wsub, rows=rows, cols=cols, n_weight_cols=wcols.numel())
    escalations = 0
    Asub = A[cols][:, cols] if A is not None else None
    Gsub = G[rows][:, rows] if G is not None else None
    if spec.cost_kind == "obs" and rows.numel() and wcols.numel():
        key = (a_key, cols.numel(), hash(tuple(cols.tolist())))
        layer.A_inv, layer.G_inv, escalations = _inverses(Asub, Gsub, opts, cache, key)
    rc = torch.full((W.shape[0],), float("-inf"), device=device)
    cc = torch.full((C,), float("-inf"), device=device)
    if rows.numel() and wcols.numel():
        linear_r = linear_c = 0.0
        if grad is not None:
            gsub = grad[rows][:, cols]
            if spec.cost_kind == "obs":  # OBS at the Newton point of the sub-problem: W' = W − G⁻¹ s∇W A⁻¹
                U = newton_step(gsub, layer.G_inv, layer.A_inv)
                layer.extra_gain = -0.5 * float((gsub * U).sum())
                Wsub = Wsub - U
                layer.W = Wsub
            else:  # no update (K-OBD): removing w costs −s⟨∇w, w⟩ + ½ wᵀFw
                gw = gsub * Wsub
                linear_r, linear_c = -gw.sum(dim=1), -gw.sum(dim=0)[: wcols.numel()]
        rc[rows] = row_costs(Wsub, kind=spec.cost_kind, A=Asub, G=Gsub, G_inv=layer.G_inv) + linear_r
        cc[wcols] = column_costs(Wsub, kind=spec.cost_kind, A=Asub, G=Gsub,
                                 A_inv=layer.A_inv)[: wcols.numel()] + linear_c
    layer.row_cost, layer.col_cost = rc, cc
    return layer, escalations


def _prepare_elements(name, lin, W, A, G, opts, spec, device, a_key, cache, grad=None) -> tuple[LayerProblem, int]:
    C = lin.in_features
    layer = LayerProblem(name, lin, W, n_weight_cols=C)
    escalations = 0
    if spec.cost_kind == "obs":
        layer.A_inv, layer.G_inv, escalations = _inverses(A, G, opts, cache, a_key)
    zero = W[:, :C] == 0  # removed in earlier shots: always removed again
    if grad is not None and spec.cost_kind == "obs":  # OBS at the Newton point W' = W − G⁻¹ s∇W A⁻¹
        U = newton_step(grad, layer.G_inv, layer.A_inv)
        layer.extra_gain = -0.5 * float((grad * U).sum())
        layer.W = W = W - U
    costs = element_costs(W, kind=spec.cost_kind, A=A, G=G, A_inv=layer.A_inv, G_inv=layer.G_inv)[:, :C]
    if grad is not None:
        if spec.cost_kind != "obs":  # no update (K-OBD): removing w costs −s∇w·w + ½F w²
            costs = costs - (grad * W)[:, :C]
        costs = costs.masked_fill(zero, float("-inf"))
    st = opts.structure_spec
    if st.kind == "nm":
        layer.costs, layer.nm_drop = nm_groups(costs, st.n, st.m)
    else:
        layer.costs = costs
    return layer, escalations


def apply_structured(layer: LayerProblem, row_sel: torch.Tensor, col_sel: torch.Tensor, opts) -> torch.Tensor:
    """The new augmented weight (R, C') of a layer whose selected rows and columns are removed."""
    lin, C = layer.lin, layer.lin.in_features
    out = torch.zeros(lin.out_features, C + (1 if lin.bias is not None else 0), device=layer.W.device)
    if layer.rows.numel() == 0 or layer.n_weight_cols == 0:
        return out
    Wsub = layer.W
    # positions inside the sub-problem of the rows/columns chosen this shot
    r_pos = torch.nonzero(row_sel[layer.rows]).flatten()
    c_pos = torch.nonzero(col_sel[layer.cols[: layer.n_weight_cols]]).flatten()
    if opts.spec.update and opts.structured_update == "sum":
        # the reference code's form: row and column updates both computed from the current W, then summed
        dW = torch.zeros_like(Wsub)
        if r_pos.numel():
            dW += obs_update_rows(Wsub, layer.G_inv, r_pos, max_correlate=opts.max_correlate) - Wsub
        if c_pos.numel():
            dW += obs_update_columns(Wsub, layer.A_inv, c_pos, max_correlate=opts.max_correlate) - Wsub
        Wsub = Wsub + dW
        Wsub[r_pos, :] = 0
        Wsub[:, c_pos] = 0
    elif opts.spec.update:
        # rows first, then the columns of the row-updated W (every removal is compensated)
        if r_pos.numel():
            Wsub = obs_update_rows(Wsub, layer.G_inv, r_pos, max_correlate=opts.max_correlate)
        if c_pos.numel():
            Wsub = obs_update_columns(Wsub, layer.A_inv, c_pos, max_correlate=opts.max_correlate)
    else:
        Wsub = Wsub.clone()
        Wsub[r_pos, :] = 0
        Wsub[:, c_pos] = 0
    out[layer.rows.unsqueeze(1), layer.cols.unsqueeze(0)] = Wsub
    return out


def element_drop(layer: LayerProblem, sel: torch.Tensor, opts) -> torch.Tensor:
    """The entries (R, C) removed from a layer: ``sel`` itself, or for N:M the chosen groups' cheapest entries."""
    st = opts.structure_spec
    if st.kind == "nm":
        return layer.nm_drop & sel.repeat_interleave(st.m, dim=1)
    return sel


def apply_elements_grouped(layers: list[LayerProblem], drops: list[torch.Tensor], opts, batch_layers: int,
                           prepare: Callable[[LayerProblem], None],
                           write: Callable[[LayerProblem, torch.Tensor], None]) -> None:
    """Element removal: OBS updates of same-shaped layers solved as one batch of at most ``batch_layers``.

    ``prepare(layer)`` brings a layer's working weight and inverses to the device just before its batch, and
    ``write(layer, W_new)`` stores the result right after it, so only one batch is alive at a time.
    """
    if not opts.spec.update:
        for l, d in zip(layers, drops):
            prepare(l)
            W = l.W.clone()
            W[:, : d.shape[1]][d] = 0
            write(l, W)
        return
    by_shape: dict[tuple, list[int]] = {}
    for i, l in enumerate(layers):
        shape = (l.lin.out_features, l.lin.in_features + (l.lin.bias is not None))
        by_shape.setdefault((l.name.rsplit(".", 1)[-1], shape), []).append(i)
    parts = [idx[s : s + batch_layers] for idx in by_shape.values() for s in range(0, len(idx), batch_layers)]
    at_once = opts.update_concurrent_batches
    for g in range(0, len(parts), at_once):
        group = parts[g : g + at_once]
        for part in group:
            for i in part:
                prepare(layers[i])
        problems = [(torch.stack([layers[i].W for i in part]), torch.stack([drops[i] for i in part]),
                     torch.stack([layers[i].G_inv for i in part]), torch.stack([layers[i].A_inv for i in part]))
                    for part in group]
        new_W = obs_update_elements_concurrent(problems, max_correlate=opts.max_correlate,  # one: no side streams
                                              solve_dtype=opts.solve_dtype)
        del problems
        for part, W in zip(group, new_W):
            for k, i in enumerate(part):
                write(layers[i], W[k])
        del new_W
