"""Coupled structures: FFN units, attention heads and key/value groups removed as one (docs/method.md §1.7).

A unit spans several linears of one decoder layer:

- FFN unit j: row j of every ``adapter.mlp_in`` linear (gate/up, or fc1 with its bias; rows j and I + j of a fused
  gate_up of width 2I) + column j of ``mlp_out``;
- head h (GQA only): the q rows of head h + the matching o columns;
- key/value group g: k and v rows of kv head g + q rows and o columns of all its query heads (without GQA a group
  is one head with its q, k, v rows and o columns).

Under the block-diagonal K-FAC (each linear its own G ⊗ A) the joint OBS cost of a unit is the sum over its member
linears of the multi-row cost ½ tr(W_R A W_Rᵀ (G⁻¹[R,R])⁻¹) (producers) or multi-column cost
½ tr(W_Cᵀ G W_C (A⁻¹[C,C])⁻¹) (consumer); the update is ``obs_update_rows`` / ``obs_update_columns`` per
member.
One global greedy selection over all units of all layers, cheapest first, with exact parameter accounting; the
order is by cost (``score="cost"``, as the paper's threshold on structure costs) or by cost per parameter
(``score="per_param"``: the greedy rule of a knapsack, which does not favour the small FFN units over heads and kv
groups 40-170 times their size merely for being small).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ArchitectureAdapter, get_submodule
from .linalg import damped_inverse, solve_spd
from .update import obs_update_columns, obs_update_rows

__all__ = ["UnitFamily", "layer_units", "multi_row_costs", "unit_costs", "select_units", "apply_units",
           "coupled_shot"]


@dataclass
class UnitFamily:
    """Units of one kind in one decoder layer. ``members``: (linear name, "rows"|"cols", idx (U, k)).
    ``parts[u]``: atomic part keys removed by unit u (a kv group contains its heads' parts)."""

    layer: int
    kind: str  # "ffn" | "head" | "kv"
    members: list[tuple[str, str, torch.Tensor]]
    parts: list[tuple]
    costs: torch.Tensor | None = None


def _span(idx: torch.Tensor, width: int) -> torch.Tensor:
    """(U,) block indices -> (U, width) rows of each block."""
    return idx[:, None] * width + torch.arange(width)[None, :]


def _merge(members: list[tuple[str, str, torch.Tensor]]) -> list[tuple[str, str, torch.Tensor]]:
    """Members on the same linear and axis as one member (a fused layer's segments: one joint multi-row cost)."""
    out: dict[tuple[str, str], list[torch.Tensor]] = {}
    for name, axis, idx in members:
        out.setdefault((name, axis), []).append(idx)
    return [(name, axis, torch.cat(idx, dim=1)) for (name, axis), idx in out.items()]


def layer_units(layer: nn.Module, adapter: ArchitectureAdapter, layout: tuple[int, int, int], i: int
                ) -> tuple[list[UnitFamily], dict[tuple, int]]:
    """Unit families of decoder layer ``i`` and the parameter count of every atomic part. In a fused layer
    (Phi-3's gate_up_proj, qkv_proj) a unit's rows in every segment are one member of that one linear."""
    n_heads, n_kv, hd = layout
    lin = {n: get_submodule(layer, n) for n in adapter.linears}
    part_params: dict[tuple, int] = {}
    fams = []
    # FFN
    inter = lin[adapter.mlp_out].in_features
    j = torch.arange(inter)[:, None]
    segments = adapter.mlp_rows(inter)
    per_unit = sum(lin[n].in_features for n, _ in segments) + lin[adapter.mlp_out].out_features
    fams.append(UnitFamily(i, "ffn", _merge([(n, "rows", j + off) for n, off in segments])
                           + [(adapter.mlp_out, "cols", j)],
                           [((i, "ffn", u),) for u in range(inter)]))
    part_params.update({(i, "ffn", u): per_unit for u in range(inter)})
    # attention
    rows = adapter.attention_rows(layout)
    (q, q0), (k, k0), (v, v0) = rows["q"], rows["k"], rows["v"]
    o = adapter.attention_out
    group = n_heads // n_kv
    head_params = hd * (lin[q].in_features + lin[o].out_features)
    kv_params = hd * (lin[k].in_features + lin[v].in_features)
    part_params.update({(i, "head", h): head_params for h in range(n_heads)})
    part_params.update({(i, "kv", g): kv_params for g in range(n_kv)})
    if group > 1:
        h = torch.arange(n_heads)
        fams.append(UnitFamily(i, "head", [(q, "rows", q0 + _span(h, hd)), (o, "cols", _span(h, hd))],
                               [((i, "head", u),) for u in range(n_heads)]))
    g = torch.arange(n_kv)
    qh = _span(g, group)  # (n_kv, group) query heads of each group
    q_rows = (qh[:, :, None] * hd + torch.arange(hd)).reshape(n_kv, group * hd)
    fams.append(UnitFamily(i, "kv", _merge([(q, "rows", q0 + q_rows), (k, "rows", k0 + _span(g, hd)),
                                            (v, "rows", v0 + _span(g, hd))]) + [(o, "cols", q_rows)],
                           [((i, "kv", u),) + tuple((i, "head", int(x)) for x in qh[u]) for u in range(n_kv)]))
    return fams, part_params


def multi_row_costs(W: torch.Tensor, A: torch.Tensor | None, G_inv: torch.Tensor | None, groups: torch.Tensor,
                    *, kind: str = "obs", G: torch.Tensor | None = None) -> torch.Tensor:
    """Cost of removing each row set ``groups[u]`` (U, k) of W (R, C'): "obs" ½ tr(W_R A W_Rᵀ (G⁻¹[R,R])⁻¹).

    Columns of a consumer: call with Wᵀ, G for A and A⁻¹ for G⁻¹. Other kinds use the diagonals (K-OBD:
    ½ Σ_r G_rr w_rᵀ diag(A) w_r; L-OBD: G = I; identity: ½‖W_R‖²). A/G None = identity.
    """
    WR = W[groups].double()  # (U, k, C')
    if kind == "identity":
        return 0.5 * WR.square().sum(dim=(1, 2))
    if kind in ("kfac-diag", "activations"):
        a = torch.diagonal(A).double() if A is not None else torch.ones(W.shape[1], dtype=torch.float64)
        g = torch.diagonal(G).double()[groups] if (kind == "kfac-diag" and G is not None) else 1.0
        return (0.5 * (WR.square() * a).sum(dim=2) * g).sum(dim=1)
    M = WR @ A.double() @ WR.transpose(1, 2) if A is not None else WR @ WR.transpose(1, 2)  # (U, k, k)
    if G_inv is None:
        return 0.5 * torch.diagonal(M, dim1=1, dim2=2).sum(dim=1)
    B = G_inv.double()[groups[:, :, None], groups[:, None, :]]  # (U, k, k), principal blocks of a PD inverse
    return 0.5 * torch.diagonal(_spd_solve(B, M), dim1=1, dim2=2).sum(dim=1)  # tr(M B⁻¹) = tr(B⁻¹ M)


def _spd_solve(B: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """B⁻¹ M for a batch of symmetric positive definite B, through a batched Cholesky (not the batched LU of
    ``torch.linalg.solve``, which returned garbage for blocks of 192 on a multi-threaded CPU). A block whose Cholesky
    fails (not positive definite by rounding) is solved on its own, damped as :func:`linalg.solve_spd` does."""
    L, info = torch.linalg.cholesky_ex(B)
    X = torch.cholesky_solve(M, L)
    for u in torch.nonzero(info).flatten().tolist():
        X[u] = solve_spd(B[u], M[u])
    return X


def unit_costs(fam: UnitFamily, W: dict[str, torch.Tensor], A: dict, G: dict, A_inv: dict, G_inv: dict,
               kind: str = "obs") -> torch.Tensor:
    """Joint cost of every unit of a family: sum over its member linears (independent K-FAC blocks)."""
    total = 0.0
    for name, axis, idx in fam.members:
        idx = idx.to(W[name].device)
        if axis == "rows":
            total = total + multi_row_costs(W[name], A.get(name), G_inv.get(name), idx, kind=kind, G=G.get(name))
        else:
            total = total + multi_row_costs(W[name].T, G.get(name), A_inv.get(name), idx, kind=kind, G=A.get(name))
    return total


def _dead(fam: UnitFamily, W: dict[str, torch.Tensor]) -> torch.Tensor:
    alive = 0
    for name, axis, idx in fam.members:
        Wm = W[name] if axis == "rows" else W[name][:, : W[name].shape[1]].T
        alive = alive + Wm.abs()[idx.to(Wm.device)].sum(dim=(1, 2))
    return alive == 0


SCORES = ("cost", "per_param")


def select_units(costs: list[torch.Tensor], parts: list[list[tuple]], part_params: dict[tuple, int],
                 n_remove: int, score: str = "cost") -> list[torch.Tensor]:
    """Greedy cheapest-first over all units until ``n_remove`` parameters are removed (never more).

    ``score``: "cost" orders by the unit's cost, "per_param" by its cost divided by its parameter count.
    A unit's price is the parameters of its parts not yet taken (a kv group after some of its heads); dead units
    come with cost −inf and are always taken. Taking the last query head of a kv group takes the group's k/v rows
    too (they then feed nothing). Returns a boolean mask per family.
    """
    if score not in SCORES:
        raise ValueError(f"unknown coupled score {score!r}; choose from {', '.join(SCORES)}")
    flat = torch.cat([c.double().cpu() for c in costs])
    owner = [(f, u) for f, c in enumerate(costs) for u in range(c.numel())]
    key = flat
    if score == "per_param":
        size = torch.tensor([float(sum(part_params[p] for p in parts[f][u])) for f, u in owner], dtype=torch.float64)
        key = flat / size  # dead units stay at -inf
    order = torch.argsort(key, stable=True).tolist()
    kv_heads: dict[tuple, list[tuple]] = {}
    head_kv: dict[tuple, tuple] = {}
    for fp in parts:
        for p in fp:
            if p[0][1] == "kv":
                kv_heads[p[0]] = list(p[1:])
                for h in p[1:]:
                    head_kv[h] = p[0]
    taken: set = set()
    removed = 0
    masks = [torch.zeros(c.numel(), dtype=torch.bool) for c in costs]
    for pos in order:
        f, u = owner[pos]
        new = [p for p in parts[f][u] if p not in taken]
        dead = flat[pos] == float("-inf")
        extra = []
        for p in new:  # completing a group's heads takes its k/v rows
            g = head_kv.get(p)
            if g is not None and g not in taken and g not in new and \
                    all(h in taken or h in new for h in kv_heads[g]):
                extra.append(g)
        price = sum(part_params[p] for p in new + extra)
        if not dead and removed + price > n_remove:
            continue
        taken.update(new + extra)
        removed += price
        masks[f][u] = True
    # units whose parts were all taken through other units count as removed too
    for f, fp in enumerate(parts):
        for u, pu in enumerate(fp):
            if not masks[f][u] and all(p in taken for p in pu):
                masks[f][u] = True
    return masks


@torch.no_grad()
def apply_units(fams: list[UnitFamily], masks: list[torch.Tensor], W: dict[str, torch.Tensor],
                A_inv: dict, G_inv: dict, *, update: bool, max_correlate: int = 0) -> dict[str, torch.Tensor]:
    """New augmented weights of one layer: the selected units' rows/columns, plus rows/columns already all-zero
    (kept zero by the joint OBS solve), removed with the optimal update (or zeroed when ``update`` is False)."""
    rows: dict[str, list] = {}
    cols: dict[str, list] = {}
    for fam, mask in zip(fams, masks):
        for name, axis, idx in fam.members:
            (rows if axis == "rows" else cols).setdefault(name, []).append(idx[mask.cpu()].reshape(-1))
    out = {}
    for name, Wn in W.items():
        if name in rows:
            sel = torch.cat(rows[name] + [torch.nonzero(Wn.abs().sum(dim=1) == 0).flatten().cpu()]).unique()
            sel = sel.to(Wn.device)
            if update and G_inv.get(name) is not None and sel.numel():
                out[name] = obs_update_rows(Wn, G_inv[name], sel, max_correlate=max_correlate)
            else:
                out[name] = Wn.clone()
                out[name][sel] = 0
        elif name in cols:
            n_in = A_inv[name].shape[0] if A_inv.get(name) is not None else Wn.shape[1]
            dead = torch.nonzero(Wn.abs().sum(dim=0) == 0).flatten().cpu()
            dead = dead[dead < min(n_in, Wn.shape[1])]
            sel = torch.cat(cols[name] + [dead]).unique().to(Wn.device)
            if update and A_inv.get(name) is not None and sel.numel():
                out[name] = obs_update_columns(Wn, A_inv[name], sel, max_correlate=max_correlate)
            else:
                out[name] = Wn.clone()
                out[name][:, sel] = 0
    return out


@dataclass
class _LayerState:
    fams: list[UnitFamily]
    W: dict[str, torch.Tensor]
    A_inv: dict = field(default_factory=dict)
    G_inv: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> None:
        """Move the weights and inverses (an inverse shared by q/k/v or gate/up stays shared)."""
        moved: dict[int, torch.Tensor] = {}

        def mv(t):
            if t is None:
                return None
            if id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=False)
            return moved[id(t)]

        self.W = {n: mv(t) for n, t in self.W.items()}
        self.A_inv = {n: mv(t) for n, t in self.A_inv.items()}
        self.G_inv = {n: mv(t) for n, t in self.G_inv.items()}


def coupled_shot(layers: list[nn.Module], adapter: ArchitectureAdapter, layout: tuple[int, int, int], *,
                 get_factors: Callable[[int, str], tuple[torch.Tensor | None, torch.Tensor | None]],
                 augmented: Callable[[nn.Linear], torch.Tensor], write_back: Callable[[nn.Linear, torch.Tensor], None],
                 n_remove: int, kind: str, update: bool, damping_a: float, damping_g: float,
                 max_correlate: int = 0, offload: torch.device | str | None = None, score: str = "cost",
                 inverse_dtype: torch.dtype = torch.float64,
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[float, int]:
    """One coupled shot over all decoder layers: costs → global greedy selection → per-member updates.
    Returns (estimated loss increase, damping escalations). ``score``: the selection order (``select_units``).

    ``offload`` (e.g. "cpu"): where each layer's weights and factor inverses wait between the cost phase and the
    update phase; without it every layer's inverses are alive at once (about the size of all K-FAC factors again,
    which may not fit next to the factors on one GPU). ``progress(phase, done, total)``: after each layer's costs
    (``"costs"``) and updates (``"update"``)."""
    states, part_params, escalations = [], {}, 0
    devices = []
    for i, layer in enumerate(layers):
        fams, pp = layer_units(layer, adapter, layout, i)
        part_params.update(pp)
        lins = {n: get_submodule(layer, n) for n in adapter.linears}
        st = _LayerState(fams, {n: augmented(l) for n, l in lins.items()})
        A, G, a_inv_cache = {}, {}, {}
        for n in adapter.linears:
            A[n], G[n] = get_factors(i, n)
            if kind == "obs" and A[n] is not None:
                key = id(A[n])
                if key not in a_inv_cache:
                    a_inv_cache[key] = damped_inverse(A[n], damping_a, dtype=inverse_dtype)
                st.A_inv[n], used_a = a_inv_cache[key]
                st.G_inv[n], used_g = damped_inverse(G[n], damping_g, dtype=inverse_dtype)
                escalations += int(used_a != damping_a) + int(used_g != damping_g)
        for fam in fams:
            c = unit_costs(fam, st.W, A, G, st.A_inv, st.G_inv, kind=kind).float().cpu()
            c[_dead(fam, st.W).cpu()] = float("-inf")
            fam.costs = c
        devices.append(next(iter(st.W.values())).device)
        if offload is not None:
            st.to(torch.device(offload))
        states.append(st)
        if progress is not None:
            progress("costs", i + 1, len(layers))
    all_fams = [f for s in states for f in s.fams]
    masks = select_units([f.costs for f in all_fams], [f.parts for f in all_fams], part_params, n_remove, score=score)
    estimated = float(sum(f.costs[m & torch.isfinite(f.costs)].sum() for f, m in zip(all_fams, masks)))
    k = 0
    for j, (layer, st, dev) in enumerate(zip(layers, states, devices), 1):
        m = masks[k: k + len(st.fams)]
        k += len(st.fams)
        if offload is not None:
            st.to(dev)
        new = apply_units(st.fams, m, st.W, st.A_inv, st.G_inv, update=update, max_correlate=max_correlate)
        for n, Wn in new.items():
            write_back(get_submodule(layer, n), Wn)
        st.W = st.A_inv = st.G_inv = None
        if progress is not None:
            progress("update", j, len(layers))
    return estimated, escalations
