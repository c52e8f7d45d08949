"""Correlated OBS weight updates in Kronecker form (paper §3.4; docs/method.md §1.4).

With F = G ⊗ A, removing the set Q of weights optimally under ½ Δθᵀ F Δθ gives
    ΔW = −G⁻¹ M A⁻¹,   M scatters m = ([G⁻¹ ⊗ A⁻¹]_{Q,Q})⁻¹ w_Q into the positions Q.
Whole rows R (or columns) reduce to one factor: ΔW = −G⁻¹[:, R] (G⁻¹[R, R])⁻¹ W[R, :] (the A's cancel).

``max_correlate`` bounds how many removed structures/entries are solved jointly: 0 = all at once; k > 0 =
chunks (whole rows packed greedily for elements) solved one after another, each from the weights already updated
by the previous chunks (Gauss-Seidel, the reference code's ``--addupdate``). Removed entries end exactly zero.

The element systems are built in float64. ``solve_dtype=torch.float32`` factorizes them in float32 and recovers
float64 accuracy with ``REFINE_STEPS`` steps of iterative refinement (residual in float64), which converges while
cond(C)·2⁻²⁴ < 1; a layer whose system is not positive definite in float32, or whose last refinement step still
moved the solution by more than ``REFINED_CHANGE``, is redone in float64.
"""

from __future__ import annotations

import bisect
import contextlib
import time

import torch

from .linalg import cholesky_solve, solve_spd

REFINE_STEPS = 3  # float32 factorization: each step multiplies the error by about cond(C)·2⁻²⁴
REFINED_CHANGE = 1e-6  # the last refinement step must move x by less than this (relative), else float64 again

__all__ = ["obs_update_rows", "obs_update_columns", "obs_update_elements", "obs_update_elements_batched",
           "obs_update_elements_concurrent", "newton_step", "quadratic_loss"]


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    if size <= 0 or idx.numel() <= size:
        return [idx]
    return list(idx.split(size))


def obs_update_rows(W: torch.Tensor, G_inv: torch.Tensor, rows: torch.Tensor, *,
                    max_correlate: int = 0) -> torch.Tensor:
    """Remove ``rows`` of W (R, C') with the optimal update; returns the new W (rows exactly 0)."""
    W = W.clone()
    rows = rows.to(W.device)
    for R in _chunks(rows, max_correlate):
        X = solve_spd(G_inv[R][:, R], W[R, :])  # (|R|, C') = (G⁻¹[R,R])⁻¹ W[R,:]
        W -= (G_inv[:, R].double() @ X).to(W.dtype)  # ΔW = −G⁻¹[:,R] (G⁻¹[R,R])⁻¹ W[R,:]
        W[R, :] = 0
    W[rows, :] = 0
    return W


def obs_update_columns(W: torch.Tensor, A_inv: torch.Tensor, cols: torch.Tensor, *,
                       max_correlate: int = 0) -> torch.Tensor:
    """Remove ``cols`` of W (R, C') with the optimal update; returns the new W (columns exactly 0)."""
    W = W.clone()
    cols = cols.to(W.device)
    for Cs in _chunks(cols, max_correlate):
        X = solve_spd(A_inv[Cs][:, Cs], W[:, Cs].T)  # (|Cs|, R) = (A⁻¹[Cs,Cs])⁻¹ W[:,Cs]ᵀ
        W -= (X.T @ A_inv[Cs, :].double()).to(W.dtype)  # ΔW = −W[:,Cs] (A⁻¹[Cs,Cs])⁻¹ A⁻¹[Cs,:]
        W[:, Cs] = 0
    W[:, cols] = 0
    return W


def _row_chunks(counts: torch.Tensor, max_correlate: int) -> torch.Tensor:
    """Chunk id of every row: rows with removals are packed greedily, in order, into chunks of at most
    ``max_correlate`` removed entries (a longer row is a chunk of its own); rows without removals get -1.

    One bisection of the running count per chunk (not a Python step per row)."""
    counts = counts.detach().to("cpu", torch.long)
    n = counts.numel()
    chunk_of = torch.full((n,), -1, dtype=torch.long)
    has = counts > 0
    if n == 0 or not bool(has.any()):
        return chunk_of
    if max_correlate <= 0:
        chunk_of[has] = 0
        return chunk_of
    cum = torch.cumsum(counts, 0).tolist()
    total, base, s, starts = cum[-1], 0, 0, []
    while base < total:
        e = bisect.bisect_right(cum, base + max_correlate, s) - 1  # last row that still fits
        if e < s or cum[e] == base:  # the next row with removals alone exceeds max_correlate
            e = bisect.bisect_right(cum, base, s)
        starts.append(s)
        base, s = cum[e], e + 1
    chunk_of = torch.searchsorted(torch.tensor(starts), torch.arange(n), right=True) - 1
    chunk_of[~has] = -1
    return chunk_of


class _ChunkPlan:
    """Where every removed entry of a batch of layers goes, step by step (host-side bookkeeping, built once).

    Layers are ordered by decreasing chunk count (``order``), so the layers still working at step j are the first
    ``k[j]``. Step j holds a (k[j], P[j]) block of the chunk's rows (padding: row 0, whose M row stays 0) and
    (k[j], Q[j]) blocks of the entries' columns (padding 0) and row slots (position of the entry's row among
    the chunk's rows; padding P[j]), laid out one after another in flat tensors at offsets ``ro[j]``/``eo[j]``.
    """

    def __init__(self, drop: torch.Tensor, max_correlate: int, device: torch.device | None = None):
        dev = drop.device if device is None else device
        d = drop.detach().to(dev, torch.bool)
        B, R, _ = d.shape
        counts = d.sum(-1)  # (B, R)
        counts_cpu = counts.cpu()
        row_chunk = (torch.stack([_row_chunks(counts_cpu[b], max_correlate) for b in range(B)]) if B
                     else torch.empty(0, R, dtype=torch.long))
        n_chunks = row_chunk.max(1).values + 1 if R else torch.zeros(B, dtype=torch.long)
        self.order = torch.argsort(n_chunks, descending=True, stable=True)  # on the host
        self.steps = steps = int(n_chunks.max()) if B else 0
        if steps == 0:
            return
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(B)
        rank, row_chunk = rank.to(dev), row_chunk.to(dev)
        # rows with removals, in (layer, row) order: each (layer, chunk) group is contiguous
        rb, rr = torch.nonzero(counts > 0, as_tuple=True)
        rch = row_chunk[rb, rr]
        rkey = rb * steps + rch
        rsizes = torch.bincount(rkey, minlength=B * steps)
        rpos = torch.arange(rkey.numel(), device=dev) - (torch.cumsum(rsizes, 0) - rsizes)[rkey]
        rsizes = rsizes.view(B, steps)
        k = (rsizes > 0).sum(0)  # layers working at each step: a prefix in ``order``
        P = rsizes.max(0).values
        ro = torch.cumsum(k * P, 0) - k * P
        self.rows = torch.zeros(int((k * P).sum()), dtype=torch.long, device=dev)
        self.rows[ro[rch] + rank[rb] * P[rch] + rpos] = rr
        slot = torch.zeros(B, R, dtype=torch.int32, device=dev)
        slot[rb, rr] = rpos.to(torch.int32)
        # removed entries, in (layer, row, column) order: each (layer, chunk) group is contiguous too
        eb, er, ec = torch.nonzero(d, as_tuple=True)
        ech = row_chunk[eb, er]
        ekey = eb * steps + ech
        esizes = torch.bincount(ekey, minlength=B * steps)
        epos = torch.arange(ekey.numel(), device=dev) - (torch.cumsum(esizes, 0) - esizes)[ekey]
        Q = esizes.view(B, steps).max(0).values
        eo = torch.cumsum(k * Q, 0) - k * Q
        dest = eo[ech] + rank[eb] * Q[ech] + epos
        self.cols = torch.zeros(int((k * Q).sum()), dtype=torch.int32, device=dev)
        self.cols[dest] = ec.to(torch.int32)
        self.slots = torch.repeat_interleave(P.to(torch.int32), k * Q)
        self.slots[dest] = slot[eb, er]
        self.k, self.P, self.Q, self.ro, self.eo = (t.tolist() for t in (k, P, Q, ro, eo))


def _tick(phases: dict | None, name: str, t0: float, dev: torch.device) -> float:
    """Instrumented runs only: synchronise and add the time since ``t0`` to ``phases[name]``."""
    if phases is None:
        return t0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    phases[name] = phases.get(name, 0.0) + t - t0
    return t


def obs_update_elements_batched(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                                max_correlate: int = 2000, solve_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """:func:`obs_update_elements` for a batch of B independent layers of one shape (GPU-friendly).

    W (B, R, C'), drop (B, R, C), G_inv (B, R, R), A_inv (B, C', C'). Chunk j of every layer is solved in one
    batched Cholesky; within a layer the chunks stay sequential (Gauss-Seidel). A chunk holds whole rows S, so
    ΔW = −G⁻¹[:, S] (M_S A⁻¹) with M_S (|S|, C') holding the chunk's m: |S|·C'·(C' + R) flops instead of
    R·C'·|Q|. The layers are reordered by chunk count (a copy of the inputs when they are not in that order
    already) so that finished layers drop out of the batch. Positive-definiteness is checked once at the end;
    a layer whose Cholesky failed is redone alone, damped as :func:`linalg.solve_spd` does.
    """
    return _update_elements(W, drop, G_inv, A_inv, max_correlate=max_correlate, solve_dtype=solve_dtype)


def obs_update_elements_concurrent(problems: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], *,
                                   max_correlate: int = 2000, streams: bool = True,
                                   solve_dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """:func:`obs_update_elements_batched` for several independent batches (e.g. one per layer shape) at once.

    The batches advance one chunk step each in turn; on CUDA each batch issues its work on a stream of its own, so
    the GPU can overlap their factorizations (one batched Cholesky of <= 30 systems may not fill the GPU). Results
    equal those of solving the batches one after another. All batches' working memory is alive at the same time.
    """
    steps = [_update_steps(*p, max_correlate=max_correlate, solve_dtype=solve_dtype) for p in problems]
    if not steps:
        return []
    dev = problems[0][0].device
    own_streams = streams and dev.type == "cuda" and len(steps) > 1
    if own_streams:
        main = torch.cuda.current_stream(dev)
        side = [torch.cuda.Stream(dev) for _ in steps]
        for st in side:
            st.wait_stream(main)  # the inputs were made on the main stream
    results: list = [None] * len(steps)
    live = list(range(len(steps)))
    while live:
        for i in list(live):
            with torch.cuda.stream(side[i]) if own_streams else contextlib.nullcontext():
                try:
                    next(steps[i])
                except StopIteration as done:
                    results[i] = done.value
                    live.remove(i)
    if own_streams:
        for st in side:
            main.wait_stream(st)
        torch.cuda.synchronize(dev)  # the side streams' memory goes back to the allocator only after their work
    return results


def _update_elements(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                     max_correlate: int, strict: bool = False, phases: dict | None = None,
                     solve_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Implementation of :func:`obs_update_elements_batched`. ``strict``: check every Cholesky at once and jitter
    (host sync per step; the fallback for failed layers, always float64). ``phases``: accumulate synchronised phase
    timings."""
    steps = _update_steps(W, drop, G_inv, A_inv, max_correlate=max_correlate, strict=strict, phases=phases,
                          solve_dtype=solve_dtype)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _update_steps(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                  max_correlate: int, strict: bool = False, phases: dict | None = None,
                  solve_dtype: torch.dtype = torch.float64):
    """:func:`_update_elements` as a generator that pauses after every chunk step (its return value is the new W),
    so that several batches can be interleaved (:func:`obs_update_elements_concurrent`)."""
    B, R, Cp = W.shape
    dev = W.device
    inputs = (W, drop, G_inv, A_inv)
    if phases is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    plan = _ChunkPlan(drop, max_correlate, dev)
    if plan.steps == 0:
        return W.clone()  # nothing to remove
    permuted = not torch.equal(plan.order, torch.arange(B))
    if permuted:
        order = plan.order.to(dev)
        W, G_inv, A_inv = W.index_select(0, order), G_inv.index_select(0, order), A_inv.index_select(0, order)
    else:
        W = W.clone()
    rows_all, cols_all, slots_all = plan.rows, plan.cols, plan.slots
    W_flat = W.view(B, R * Cp)
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    t0 = _tick(phases, "chunking", t0, dev)
    for j in range(plan.steps):
        k, P, Q, ro, eo = plan.k[j], plan.P[j], plan.Q[j], plan.ro[j], plan.eo[j]
        rows = rows_all[ro : ro + k * P].view(k, P)
        c = cols_all[eo : eo + k * Q].view(k, Q).long()
        s = slots_all[eo : eo + k * Q].view(k, Q).long()
        valid = s < P
        Gcols = torch.gather(G_inv[:k], 2, rows[:, None, :].expand(k, R, P))  # G⁻¹[:, S]   (k, R, P)
        G_SS = torch.gather(Gcols, 1, rows[:, :, None].expand(k, P, P)).double()  # G⁻¹[S, S]
        G_SS = torch.nn.functional.pad(G_SS, (0, 1, 0, 1))  # slot P (padding) reads zeros
        # C = [G⁻¹ ⊗ A⁻¹]_{Q,Q} = G⁻¹[r_q, r_q'] · A⁻¹[c_q, c_q'], identity on the padding   (k, Q, Q)
        Cmat = torch.gather(torch.gather(A_inv[:k], 1, c[:, :, None].expand(k, Q, Cp)), 2,
                            c[:, None, :].expand(k, Q, Q)).double()  # A⁻¹[c_q, c_q'], gathered before the cast
        Cmat.mul_(torch.gather(torch.gather(G_SS, 1, s[:, :, None].expand(k, Q, P + 1)), 2,
                               s[:, None, :].expand(k, Q, Q)))  # G⁻¹[r_q, r_q']
        Cmat.diagonal(dim1=-2, dim2=-1).add_((~valid).to(Cmat.dtype))
        r = torch.gather(torch.nn.functional.pad(rows, (0, 1)), 1, s)  # entry rows (padding: row 0)
        w_Q = W_flat[:k].gather(1, r * Cp + c).double().masked_fill_(~valid, 0)  # (k, Q)
        t0 = _tick(phases, "build_C", t0, dev)
        if strict:
            m = solve_spd(Cmat, w_Q, triangular=True)
        else:
            m, info = _factor_solve(Cmat, w_Q, solve_dtype)
            failed[:k] |= info != 0
        t0 = _tick(phases, "cholesky", t0, dev)
        # ΔW = −G⁻¹ M A⁻¹ = −G⁻¹[:, S] (M_S A⁻¹); M_S (k, P, C') holds m at (slot, column), padding lands in row P
        M = torch.zeros(k, (P + 1) * Cp, device=dev, dtype=W.dtype)
        M.scatter_(1, s * Cp + c, m.to(W.dtype))
        T = torch.bmm(M.view(k, P + 1, Cp)[:, :P], A_inv[:k])
        W[:k].baddbmm_(Gcols, T, alpha=-1)
        t0 = _tick(phases, "update", t0, dev)
        yield
    W[:, :, : drop.shape[2]].masked_fill_((drop.index_select(0, plan.order.to(drop.device)) if permuted
                                           else drop).to(dev), 0)
    if permuted:
        W = W.index_select(0, torch.argsort(plan.order).to(dev))
    if not strict and bool(failed.any()):  # the one host sync: redo the failed layers alone, with jitter
        for i in plan.order[torch.nonzero(failed.cpu()).flatten()].tolist():
            W[i] = _update_elements(*(t[i : i + 1] for t in inputs), max_correlate=max_correlate, strict=True)[0]
    _tick(phases, "finish", t0, dev)
    return W


def _factor_solve(C: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x = C⁻¹ b for float64 SPD systems (k, Q, Q) and b (k, Q), factorized in ``dtype``; float32 adds iterative
    refinement with float64 residuals. Returns x (float64) and an info per system: non-zero where the Cholesky
    failed or the last refinement step still moved x by more than ``REFINED_CHANGE`` of its norm."""
    L, info = torch.linalg.cholesky_ex(C if dtype == torch.float64 else C.to(dtype))
    x = cholesky_solve(b.to(L.dtype).unsqueeze(-1), L).squeeze(-1).double()
    if dtype == torch.float64:
        return x, info
    for _ in range(REFINE_STEPS):
        r = b - torch.bmm(C, x.unsqueeze(-1)).squeeze(-1)
        dx = cholesky_solve(r.to(L.dtype).unsqueeze(-1), L).squeeze(-1).double()
        x += dx
    converged = dx.norm(dim=-1) <= REFINED_CHANGE * x.norm(dim=-1)  # False for NaN
    return x, info.masked_fill(~converged, -1)


def obs_update_elements(W: torch.Tensor, drop: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor, *,
                        max_correlate: int = 2000, solve_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Remove the entries ``drop`` (R, C) — weight columns only, W may carry a bias column — with correlated OBS.

    For each chunk of rows S with entries Q: C = G⁻¹[r_q, r_q'] · A⁻¹[c_q, c_q'] (Hadamard form of the
    Kronecker block), m = C⁻¹ w_Q, ΔW = −G⁻¹ M A⁻¹ with M holding m at Q. Entries already zero are included
    (cost 0), so they stay zero.
    """
    return obs_update_elements_batched(W[None], drop[None], G_inv[None], A_inv[None],
                                       max_correlate=max_correlate, solve_dtype=solve_dtype)[0]


def newton_step(grad: torch.Tensor, G_inv: torch.Tensor, A_inv: torch.Tensor) -> torch.Tensor:
    """U = G⁻¹ ∇W A⁻¹ = F⁻¹g in matrix form: the minimiser of gᵀΔθ + ½ΔθᵀFΔθ is ΔW = −U.

    First-order OBS (docs/method.md §1.8): removing K under the model with a gradient is plain OBS applied to
    W' = W − U, i.e. costs and updates at the Newton point, plus the step −U.
    """
    return G_inv @ grad @ A_inv


def quadratic_loss(dW: torch.Tensor, A: torch.Tensor, G: torch.Tensor, grad: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(G ΔW A ΔWᵀ) — the loss increase the costs model; with ``grad`` the
    first-order term ⟨∇W, ΔW⟩ is added."""
    q = 0.5 * torch.trace(G @ dW @ A @ dW.T)
    return q if grad is None else q + (grad * dW).sum()
