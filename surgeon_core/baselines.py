"""Layer-wise pruning baselines: magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023).

Each rule works on one weight W (d_out, d_in) and the statistics of its inputs and returns new tensors; masks are
boolean with True = weight kept (torchao's contract: the pruned weight is ``W * mask``). ``n_m=(N, M)`` means N
nonzeros in every group of M consecutive input weights of a row (2:4 keeps 2 of 4). Ties are broken
deterministically (stable sort: among equal scores the lower index is pruned first), which matters because
de-quantized 4-bit weights tie often. ``prune_model_layerwise`` runs a rule over a model with the sequential
driver in ``sequential.py`` and assigns the new weights in place.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .adapters import adapter_for, get_submodule, prunable_linears
from .costs import nm_groups
from .linalg import damped_inverse_cholesky
from .sequential import run_layerwise

__all__ = [
    "METHODS",
    "PHASES",
    "flatten_inputs",
    "math_dtype",
    "accumulate_hessian_",
    "accumulate_sq_norms_",
    "InputStats",
    "magnitude_mask",
    "wanda_mask",
    "sparsegpt_prune",
    "prune_model_layerwise",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
# the progress phases of each method: run_layerwise's phases and the pruning of the linears, in the method's words
PHASES = {
    "magnitude": {"prune": "magnitude masks", "layers": "layers"},
    "wanda": {"inputs": "wanda layer inputs", "statistics": "wanda input norms", "prune": "wanda masks",
              "outputs": "wanda layer outputs", "layers": "layers"},
    "sparsegpt": {"inputs": "sparsegpt layer inputs", "statistics": "sparsegpt hessians", "prune": "sparsegpt solves",
                  "outputs": "sparsegpt layer outputs", "layers": "layers"},
}


# ---------------------------------------------------------------------------------------------------------------
# Streaming input statistics
# ---------------------------------------------------------------------------------------------------------------


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The baselines' arithmetic: fp32 for bf16/fp16/fp32 weights, float64 when a tensor is float64 (exact checks)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_inputs(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., C) activations -> (N, C) in ``dtype``: every token is one sample (OPT's fc1/fc2 already see (N, C))."""
    return x.reshape(-1, x.shape[-1]).to(dtype)


def accumulate_hessian_(H: torch.Tensor, n: int, X: torch.Tensor) -> int:
    """Running-mean update of H = 2/n Σ x xᵀ in place with N new samples X (N, C); returns the new n."""
    m = X.shape[0]
    H.mul_(n / (n + m))  # rescale the old mean before adding, so H never holds a large raw sum
    H.addmm_(X.T, X, alpha=2.0 / (n + m))  # (C, C)
    return n + m


def accumulate_sq_norms_(s: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Wanda's per-input-feature squared norms in place: s_j += Σ_tokens x_j² for X (N, C); returns s (C,)."""
    return s.add_(X.square().sum(dim=0))


class InputStats:
    """Streaming statistics of one linear's inputs (or of a group of linears reading the same input).

    ``H`` (C, C) for SparseGPT, ``sq_norms`` (C,) for Wanda, both in ``dtype`` (fp32 unless the model is float64)
    on ``device``.
    """

    #: bytes of one widened (float64) copy of the inputs; larger batches are widened and accumulated in row chunks
    WIDEN_CHUNK_BYTES = 32 << 20

    def __init__(self, in_features: int, *, hessian: bool, sq_norms: bool, device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        self.n = 0
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device) if hessian else None
        self.sq_norms = torch.zeros(in_features, dtype=dtype, device=device) if sq_norms else None

    def update(self, x: torch.Tensor) -> None:
        target = self.H if self.H is not None else self.sq_norms
        X = flatten_inputs(x.to(target.device), x.dtype)  # (N, C) in the inputs' dtype
        rows = max(1, X.shape[0])
        if target.dtype == torch.float64 and X.dtype != torch.float64:
            # float64 statistics of an fp32/bf16 model: widened a chunk at a time, never the whole batch at once
            rows = max(1, self.WIDEN_CHUNK_BYTES // (X.shape[1] * 8))
        for start in range(0, X.shape[0], rows):
            Xc = X[start:start + rows].to(target.dtype)
            if self.sq_norms is not None:
                accumulate_sq_norms_(self.sq_norms, Xc)
            if self.H is not None:
                accumulate_hessian_(self.H, self.n, Xc)
            self.n += Xc.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Mask selection (shared by the three methods)
# ---------------------------------------------------------------------------------------------------------------


def _check_target(sparsity: float, n_m: tuple[int, int] | None, in_features: int) -> None:
    if n_m is None:
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        return
    if len(n_m) != 2 or not all(isinstance(v, int) for v in n_m) or not 0 < n_m[0] < n_m[1]:
        raise ValueError(f"n_m must be (N, M) integers with 0 < N < M, got {n_m}")
    n, m = n_m
    if not math.isclose(sparsity, 1.0 - n / m, abs_tol=1e-9):
        raise ValueError(f"sparsity {sparsity} contradicts n_m={n_m}, which means sparsity {1 - n / m:g}")
    if in_features % m:
        raise ValueError(f"in-dimension {in_features} is not divisible by M={m} for {n}:{m} sparsity")


def _num_pruned(count: int, sparsity: float) -> int:
    return int(count * sparsity + 1e-6)  # floor, as the references do; the epsilon absorbs 0.29*100 = 28.999...


def _prune_smallest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (True = prune) of exactly floor(sparsity * numel) smallest scores over the whole tensor."""
    order = torch.sort(scores.flatten(), stable=True).indices
    prune = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    prune[order[: _num_pruned(scores.numel(), sparsity)]] = True
    return prune.view_as(scores)


def _prune_smallest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (True = prune) of the floor(sparsity * d_in) smallest scores of every row."""
    order = torch.sort(scores, dim=1, stable=True).indices[:, : _num_pruned(scores.shape[1], sparsity)]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


# ---------------------------------------------------------------------------------------------------------------
# The three rules
# ---------------------------------------------------------------------------------------------------------------


def magnitude_mask(W: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-layer magnitude pruning mask.

    Args:
        W: (d_out, d_in) weight, any float dtype.
        sparsity: fraction pruned; unstructured prunes exactly floor(sparsity * numel) smallest |W| of the layer.
        n_m: (N, M) keeps the N largest |W| in every group of M consecutive inputs (then sparsity = 1 - N/M).

    Returns:
        (d_out, d_in) bool, True = kept.
    """
    _check_target(sparsity, n_m, W.shape[1])
    scores = W.detach().abs().to(math_dtype(W))
    prune = nm_groups(scores, *n_m)[1] if n_m is not None else _prune_smallest(scores, sparsity)
    return ~prune


def wanda_mask(
    W: torch.Tensor, col_sq_norms: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda mask: score |W_ij| * ||X_j||_2, compared within each output row (unstructured) or group of M.

    Args:
        W: (d_out, d_in) weight.
        col_sq_norms: (d_in,) Σ_tokens x_j² of the layer's inputs (any positive scaling gives the same mask).
        sparsity: fraction pruned in every row.
        n_m: (N, M) keeps the N best-scored of every M consecutive inputs.

    Returns:
        (d_out, d_in) bool, True = kept.
    """
    _check_target(sparsity, n_m, W.shape[1])
    if col_sq_norms.shape != (W.shape[1],):
        raise ValueError(f"col_sq_norms must have shape ({W.shape[1]},), got {tuple(col_sq_norms.shape)}")
    dtype = math_dtype(W, col_sq_norms)
    scores = W.detach().abs().to(dtype) * col_sq_norms.to(device=W.device, dtype=dtype).sqrt()  # (d_out, d_in)
    prune = nm_groups(scores, *n_m)[1] if n_m is not None else _prune_smallest_per_row(scores, sparsity)
    return ~prune


def _sparsegpt_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune one block of b columns with OBS updates inside the block (W1 is updated in place).

    Returns the pruned block Q1, the scaled errors Err1 (both (d_out, b)) and the keep mask (d_out, b).
    """
    d = Hinv1.diagonal()  # (b,)
    if n_m is None:  # the mask of the whole block is chosen up front, across all rows (as the reference does)
        keep1 = ~_prune_smallest(W1.square() / d.square(), sparsity)
    else:
        keep1 = torch.ones_like(W1, dtype=torch.bool)
    Err1 = torch.empty_like(W1)
    for i in range(W1.shape[1]):
        if n_m is not None and i % n_m[1] == 0:  # N:M is chosen on the weights as updated so far
            j = i + n_m[1]
            keep1[:, i:j] = ~nm_groups(W1[:, i:j].square() / d[i:j].square(), *n_m)[1]
        err = torch.div(W1[:, i].masked_fill(keep1[:, i], 0.0), d[i], out=Err1[:, i])  # (d_out,) pruned only
        # OBS update of this and the later block columns: kept weights have err = 0, pruned ones land on ~0
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
    return W1.masked_fill(~keep1, 0.0), Err1, keep1


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    on_block: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT: OBS pruning column by column with lazy batched updates between column blocks.

    Args:
        W: (d_out, d_in) weight, any float dtype; the math runs in fp32 (float64 if W or H is) on H's device.
        H: (d_in, d_in) fp32 (or float64) Hessian 2/n Σ x xᵀ of the layer's inputs (not modified).
        sparsity: fraction pruned; unstructured chooses floor(sparsity * d_out * b) weights of each block of b
            columns by W² / diag(H⁻¹)².
        n_m: (N, M) keeps N of every M consecutive inputs of each row, chosen every M columns.
        block_size: columns per lazy-update block (a multiple of M for N:M).
        dampening_frac: λ = dampening_frac * mean(diag H) added to diag H (x10 retries if Cholesky fails).
        on_block: called after each block of columns (progress of a long solve).

    Returns:
        (W_new (d_out, d_in) in W's dtype, mask (d_out, d_in) bool with True = kept, loss: 0-dim tensor in the
        math dtype, the summed OBS estimate Σ (w - q)² / (2 [H⁻¹]_jj²)).
    """
    rows, cols = W.shape
    _check_target(sparsity, n_m, cols)
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if block_size < 1 or (n_m is not None and block_size % n_m[1]):
        raise ValueError(f"block_size must be a positive multiple of M, got {block_size} for n_m={n_m}")
    if dampening_frac < 0:
        raise ValueError(f"dampening_frac must be >= 0, got {dampening_frac}")
    out_dtype, dtype = W.dtype, math_dtype(W, H)
    H = H.detach().to(dtype).clone()
    W = W.detach().to(device=H.device, dtype=dtype).clone()  # (d_out, d_in)
    dead = H.diagonal() == 0  # inputs that were always zero: the weight is free to prune and H needs a 1
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = damped_inverse_cholesky(H, dampening_frac)  # (d_in, d_in) upper Cholesky factor of H⁻¹
    del H
    mask = torch.ones_like(W, dtype=torch.bool)
    loss = torch.zeros((), dtype=dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1, mask[:, i1:i2] = _sparsegpt_block(W1, Hinv[i1:i2, i1:i2], sparsity, n_m)
        W[:, i1:i2] = Q1
        loss += Err1.square().sum() / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # lazy update of the later blocks
        if on_block is not None:
            on_block()
    return W.to(out_dtype), mask, loss


# ---------------------------------------------------------------------------------------------------------------
# Whole-model driver
# ---------------------------------------------------------------------------------------------------------------


def _apply_rule(
    linears: dict[str, nn.Linear], rule: Callable[[str, nn.Linear], tuple[torch.Tensor, torch.Tensor | None]],
    on_linear: Callable[[], None] | None = None,
) -> dict:
    """Run ``rule`` on each linear, assign the new weight in place, and report sparsity/loss/timing;
    ``on_linear()`` is called after each linear.

    The reported sparsity is the fraction of exactly-zero weights after pruning, so zeros the weight already had
    outside the mask (de-quantized 4-bit weights have a few) count too.
    """
    report, zeros, total = {}, 0, 0
    for name, linear in linears.items():
        if not linear.weight.numel():  # a materialized layer's empty FFN: nothing to prune (no input either)
            continue
        start = time.perf_counter()
        W_new, loss = rule(name, linear)
        linear.weight.copy_(W_new.to(device=linear.weight.device, dtype=linear.weight.dtype))
        n_zero = int((linear.weight == 0).sum())
        zeros, total = zeros + n_zero, total + linear.weight.numel()
        report[name] = {"sparsity": n_zero / linear.weight.numel(), "seconds": time.perf_counter() - start}
        if loss is not None:
            report[name]["loss"] = float(loss)
        if on_linear is not None:
            on_linear()
    return {"sparsity": zeros / total if total else 0.0, "linears": report}


def _check_layerwise(method: str, linears: dict[str, nn.Linear], windows, sparsity: float,
                     n_m: tuple[int, int] | None, block_size: int) -> None:
    for name, linear in linears.items():
        try:
            _check_target(sparsity, n_m, linear.in_features)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if method == "sparsegpt" and (block_size < 1 or (n_m is not None and block_size % n_m[1])):
        raise ValueError(f"block_size must be a positive multiple of M, got {block_size} for n_m={n_m}")
    if method != "magnitude" and windows is None:
        raise ValueError(f"method {method!r} needs calibration windows")


def _magnitude_layers(model: nn.Module, adapter, sparsity: float, n_m: tuple[int, int] | None, device,
                      progress: Callable[[str, int, int], None] | None, on_linear: Callable[[], None]) -> list[dict]:
    """Magnitude pruning of every decoder layer in turn (no calibration); one report per layer."""
    layers = get_submodule(model, adapter.layers)
    reports = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        named = {name: get_submodule(layer, name) for name in adapter.linears}
        report = _apply_rule(named, lambda _name, lin: (_magnitude_pruned(lin.weight, sparsity, n_m, device), None),
                             on_linear)
        reports.append({"layer": i, **report, "seconds": time.perf_counter() - t0})
        if progress is not None:
            progress("layers", i + 1, len(layers))
    return reports


def _magnitude_pruned(W: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, device) -> torch.Tensor:
    W = W.to(device)  # the sort is the cost: do it on the accelerator even when the model sits on the CPU
    return W * magnitude_mask(W, sparsity, n_m)


def _prune_ticker(linears: dict[str, nn.Linear], block_size: int | None, progress, label: str) -> Callable[[], None]:
    """Pruning progress in units of work: SparseGPT's column blocks (``block_size``: one solve can take seconds),
    else linears; the returned ``tick()`` counts one unit."""
    units = sum((-(-lin.in_features // block_size) if block_size else 1) for lin in linears.values()
                if lin.weight.numel())
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(label, done[0], units)

    return tick


def _calibrated_rule(method, sparsity, n_m, block_size, dampening_frac, stats_dtype, tick, on_linear):
    """Wanda's or SparseGPT's (prune_layer, make_stats) pair for :func:`sequential.run_layerwise`."""
    def make_stats(linear: nn.Linear) -> InputStats:
        return InputStats(linear.in_features, hessian=method == "sparsegpt", sq_norms=method == "wanda",
                          device=linear.weight.device, dtype=stats_dtype or math_dtype(linear.weight))

    def rule(name: str, linear: nn.Linear, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        if method == "wanda":
            return linear.weight * wanda_mask(linear.weight, stats.sq_norms, sparsity, n_m), None
        W_new, _, loss = sparsegpt_prune(linear.weight, stats.H, sparsity, n_m, block_size, dampening_frac,
                                         on_block=tick)
        return W_new, loss

    def prune_layer(i: int, named: dict[str, nn.Linear], stats: dict[str, InputStats]) -> dict:
        return _apply_rule(named, lambda name, lin: rule(name, lin, stats[name]), on_linear)

    return prune_layer, make_stats


@torch.no_grad()
def prune_model_layerwise(
    model: nn.Module,
    windows: torch.Tensor | None,
    *,
    method: str,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    offload_device: torch.device | str | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    progress: Callable[[str, int, int], None] | None = None,
    true_sequential: bool = False,
    stats_dtype: torch.dtype | None = None,
) -> dict:
    """Prune every prunable linear of ``model`` in place with a layer-wise baseline (lm_head/embeddings untouched).

    Args:
        model: a causal LM covered by the adapter table.
        windows: (n, L) calibration token ids; unused (may be None) for ``method="magnitude"``.
        method: "magnitude", "wanda" or "sparsegpt".
        sparsity: fraction pruned in every linear (must equal 1 - N/M when ``n_m`` is given).
        n_m: (N, M) semi-structured pattern, e.g. (2, 4).
        batch_size, device, offload_device: see ``sequential.run_layerwise``.
        progress: ``progress(phase, done, total)`` after every unit of work, each phase named after the method and
            counted over the whole pass (:data:`PHASES`): the calibration batches to layer 0 (``"wanda layer
            inputs"``), through each layer with statistics hooks (``"wanda input norms"``, ``"sparsegpt
            hessians"``), the linears pruned (``"wanda masks"``, ``"sparsegpt solves"``, ``"magnitude masks"``),
            the batches through each pruned layer (``"wanda layer outputs"``), and ``"layers"`` per decoder layer;
            SparseGPT's solves are counted in blocks of ``block_size`` columns.
        block_size, dampening_frac: SparseGPT settings.
        true_sequential: calibrate each input group on the outputs of the already-pruned groups of the same layer
            (``sequential.run_layerwise``); default False, the Wanda/SparseGPT scripts' default.
        stats_dtype: dtype of the input statistics (SparseGPT's Hessian, Wanda's column norms) and so of the masks'
            and OBS updates' math; None: fp32 (float64 for a float64 model). float64 with an fp32 model keeps the
            forward passes in fp32 and takes fp32 rounding out of the solver only.

    Returns:
        ``{"method", "sparsity", "n_m", "achieved_sparsity", "seconds", "layers"}``; ``layers`` holds one dict per
        decoder layer with ``layer``, ``sparsity``, ``seconds`` and per-linear ``{"sparsity", "seconds"[, "loss"]}``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    adapter = adapter_for(model)
    linears = prunable_linears(model, adapter)
    _check_layerwise(method, linears, windows, sparsity, n_m, block_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    labels = PHASES[method]

    def report_phase(phase: str, done: int, total: int) -> None:
        progress(labels.get(phase, phase), done, total)

    blocks = method == "sparsegpt"
    tick = _prune_ticker(linears, block_size if blocks else None, progress, labels["prune"])
    on_linear = None if blocks else tick

    if method == "magnitude":  # no calibration: no forward passes at all
        reports = _magnitude_layers(model, adapter, sparsity, n_m, device, progress, tick)
    else:
        prune_layer, make_stats = _calibrated_rule(method, sparsity, n_m, block_size, dampening_frac, stats_dtype,
                                                   tick, on_linear)
        reports = run_layerwise(model, windows, prune_layer=prune_layer, make_stats=make_stats, adapter=adapter,
                                batch_size=batch_size, device=device, offload_device=offload_device,
                                progress=report_phase if progress is not None else None,
                                true_sequential=true_sequential)

    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    total = sum(lin.weight.numel() for lin in linears.values())
    return {
        "method": method,
        "sparsity": sparsity,
        "n_m": list(n_m) if n_m is not None else None,
        "achieved_sparsity": zeros / total,
        "seconds": time.perf_counter() - start,
        "layers": reports,
    }
