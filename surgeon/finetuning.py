"""The I/O side of mask-preserving fine-tuning (surgeon_core.finetune): recipe -> options, checkpoint in, checkpoint
out. Used by the pipeline's ``finetune`` task and by the in-process :func:`surgeon.pruning.prune_run`."""

from __future__ import annotations

import json
import math

import torch

from surgeon_core.evaluate import perplexity
from surgeon_core.finetune import FinetuneOptions, finetune, mask_violations, pruning_masks

from .config import PruneConfig
from .errors import SurgeonError
from .models import save_model

__all__ = ["finetune_steps_after", "finetune_options", "finetune_model", "run_finetune"]


def finetune_steps_after(cfg: PruneConfig, shot: int, num_shots: int) -> int:
    """Fine-tuning steps after shot ``shot`` (1-based) of ``num_shots``: ``finetune_steps`` after every shot, plus
    ``final_finetune_steps`` after the last."""
    return cfg.finetune_steps + (cfg.final_finetune_steps if shot == num_shots else 0)


def finetune_options(cfg: PruneConfig, steps: int, shot: int) -> FinetuneOptions:
    """The recipe's fine-tuning settings for ``steps`` steps after shot ``shot`` (its own data order per shot).

    bf16 compute follows ``compute_dtype: bf16`` (fp32 master weights and AdamW state); fp16 fine-tunes in fp32
    (no loss scaling here)."""
    return FinetuneOptions(steps=steps, lr=cfg.finetune_lr, train=cfg.finetune_train,
                           schedule=cfg.finetune_schedule, warmup_steps=min(cfg.finetune_warmup, steps),
                           batch_size=cfg.finetune_batch_size,
                           autocast_dtype=torch.bfloat16 if cfg.compute_dtype == "bf16" else None,
                           device=cfg.device, seed=cfg.seed + 1000 * shot)


def held_out_loss(model, windows: torch.Tensor, cfg: PruneConfig) -> float:
    """Mean next-token loss of ``windows`` (the fine-tuning validation measure); a model gone NaN/Inf scores inf."""
    try:
        return perplexity(model, windows, batch_size=cfg.finetune_batch_size, device=cfg.device)["nll"]
    except FloatingPointError:
        return math.inf


def finetune_model(model, windows: torch.Tensor, cfg: PruneConfig, steps: int, shot: int, on_step=None) -> dict:
    """Fine-tune an in-memory pruned model; checks that every pruned weight is still exactly 0 afterwards."""
    from .pruning import peak_rss_gb

    masks = pruning_masks(model)
    validate, train = None, windows
    n_val = int(round(cfg.finetune_holdout * windows.shape[0]))
    if cfg.finetune_holdout > 0:
        if not 0 < n_val < windows.shape[0]:
            raise SurgeonError(f"finetune_holdout {cfg.finetune_holdout} of {windows.shape[0]} calibration windows "
                               "leaves no window to train or to validate on")
        train, held = windows[:-n_val], windows[-n_val:]
        validate = lambda m: held_out_loss(m, held, cfg)  # noqa: E731
    rep = finetune(model, train, options=finetune_options(cfg, steps, shot), on_step=on_step, validate=validate,
                   validate_every=cfg.finetune_validate_every)
    bad = mask_violations(model, masks)
    if bad:  # only a library bug can get here: never hand such weights on
        raise SurgeonError(f"fine-tuning after shot {shot} changed {bad} pruned weights")
    report = rep.to_dict()
    report.update(shot=shot, peak_rss_gb=peak_rss_gb())
    return report


def run_finetune(cfg: PruneConfig, source_dir: str, calib_path: str, steps: int, shot: int, ckpt_dir: str,
                 on_step=None) -> dict:
    """Load the checkpoint ``source_dir``, fine-tune it ``steps`` steps on the calibration windows ``calib_path``
    (pruned weights stay exactly 0) and write an HF-loadable checkpoint with ``state.json``, atomically.

    Returns the report: loss and lr per step, seconds, tokens, optimizer-state bytes, peak memory.
    ``on_step(step, loss, lr)`` is called after every optimizer step."""
    from .pruning import _load_for_pruning, _load_windows

    model, tok = _load_for_pruning(source_dir, cfg)
    report = finetune_model(model, _load_windows(calib_path), cfg, steps, shot, on_step=on_step)
    state = {"shot": shot, "finetune_steps": steps, "config_hash": cfg.config_hash(), "report": report}
    save_model(model, tok, ckpt_dir, extra_files={"state.json": json.dumps(state, indent=1)})
    return report
