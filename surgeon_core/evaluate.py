"""Paper-protocol perplexity: non-overlapping windows, mean next-token NLL per window, ppl = exp(mean)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

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
) -> dict:
    """Perplexity of ``model`` over token ``windows`` (n, L).

    Returns ``{"ppl", "nll", "tokens", "windows", "seqlen", "seconds", "tokens_per_second"}``; ``nll`` is the
    mean over windows of the per-window mean NLL (positions 1..L-1), as SparseGPT/Wanda/LLM Surgeon compute it.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError("windows must be a non-empty (n, seqlen) tensor")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, L = windows.shape
    per_window = torch.empty(n, dtype=torch.float64)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            nll = sequence_nll(model, batch)
        per_window[i : i + batch.shape[0]] = nll.double().cpu() / (L - 1)
        if progress is not None:
            progress(min(i + batch_size, n), n)
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
