"""Paper-protocol perplexity: non-overlapping windows, mean next-token NLL per window, ppl = exp(mean)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from . import distributed
from .lm import sequence_nll

__all__ = ["windows_from_ids", "perplexity"]


def windows_from_ids(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut one long id sequence (N,) into non-overlapping (n, seqlen) windows; the remainder is dropped.

    A 2-D input is taken as windows already (its width must equal ``seqlen``).
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if ids.dim() == 2:
        if ids.shape[1] != seqlen:
            raise ValueError(f"windows have {ids.shape[1]} tokens, expected seqlen {seqlen}")
        windows = ids
    else:
        n = ids.numel() // seqlen
        if n == 0:
            raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
        windows = ids[: n * seqlen].view(n, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows.long()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    process_group=None,
) -> dict:
    """Perplexity of ``model`` over token ``windows`` (n, L).

    Returns ``{"ppl", "nll", "tokens", "windows", "seqlen", "seconds", "tokens_per_second"}``; ``nll`` is the
    mean over windows of the per-window mean NLL (positions 1..L-1), as SparseGPT/Wanda/LLM Surgeon compute it.
    Under an initialised process group (``process_group`` or the default one) every rank passes the same windows
    and evaluates a contiguous share of them; the per-window NLLs are summed across ranks into one vector, so the
    mean is taken in the same order as in one process. Every rank runs the same number of forward passes (a rank
    short of windows repeats one and discards it), as a model with FSDP-sharded weights needs.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError("windows must be a non-empty (n, seqlen) tensor")
    dp = distributed.resolve(process_group)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, L = windows.shape
    mine = distributed.share(n, dp.rank, dp.world_size) if dp else slice(0, n)
    count, most = mine.stop - mine.start, -(-n // dp.world_size) if dp else n  # this rank's and the largest share
    rounds = -(-most // batch_size)  # forward passes per rank, the same on every rank
    per_window = torch.zeros(n, dtype=torch.float64)
    start = time.perf_counter()
    for r in range(rounds):
        lo = mine.start + r * batch_size
        hi = min(lo + batch_size, mine.stop)
        batch = windows[lo:hi] if hi > lo else windows[:1]  # a padding pass for FSDP's collectives
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            nll = sequence_nll(model, batch.to(device))
        if hi > lo:
            per_window[lo:hi] = nll.double().cpu() / (L - 1)
        if progress is not None:
            progress(min((r + 1) * batch_size, count), count)
    if dp is not None:
        per_window = distributed.all_reduce_(per_window, dp).cpu()
    seconds = time.perf_counter() - start
    model.train(was_training)
    mean_nll = float(per_window.mean())
    if not math.isfinite(mean_nll):
        raise FloatingPointError("perplexity is not finite: the model produced NaN/Inf losses")
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": n * L,
        "windows": n,
        "seqlen": L,
        "seconds": seconds,
        "tokens_per_second": n * L / seconds if seconds > 0 else float("inf"),
    }
