"""Mask-preserving fine-tuning of a pruned model (no adapters): the surviving weights are trained directly.

The paper interleaves low-rank (LoRA) first-order corrections between shots (paper §3.6); the reference
code's LoRA path never runs. Here the remaining weights themselves are trained with AdamW on the next-token loss,
and every pruned weight (exactly 0 when training starts) stays exactly 0:

- masks are taken from the weights: an entry of a prunable linear is pruned iff it is exactly 0; a bias entry is
  pruned iff it is 0 and its whole weight row is 0 (a removed output feature);
- gradients are multiplied by the masks before clipping and the optimizer step (so AdamW's moments of pruned
  entries stay 0), and the parameters are re-masked after every step (a guard, it costs one multiply).

What is trained: ``"linears"`` (the prunable linears' weights and biases), ``"norms"`` (LayerNorm/RMSNorm
parameters: every parameter of a module that is neither a Linear nor an Embedding) or ``"both"``. Embeddings and the
vocabulary head stay frozen.

Memory-aware precision: the optimizer always works on fp32 parameters. A model kept in fp32 (CPU) is its own master
copy; a model held in bf16/fp16 (GPU) gets fp32 master copies of the *trained* parameters only, with fp32 AdamW
state, and the bf16 weights are refreshed from the masters after each step. ``autocast_dtype`` (e.g. bf16) runs the
forward/backward in that dtype either way. The model is kept in eval mode (no dropout) so a seed fixes the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adapters import ArchitectureAdapter, adapter_for, prunable_linears
from .lm import sequence_nll

__all__ = ["FinetuneOptions", "FinetuneReport", "pruning_masks", "mask_violations", "trainable_parameters",
           "lr_factor", "finetune"]

TRAIN_SETS = ("linears", "norms", "both")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class FinetuneOptions:
    """Settings of one fine-tuning run. ``steps`` optimizer steps of ``batch_size`` calibration windows each."""

    steps: int = 0
    lr: float = 1e-5
    train: str = "linears"  # "linears" | "norms" | "both"
    schedule: str = "cosine"  # after warmup: "constant", "cosine" (to 0) or "linear" (to 0)
    warmup_steps: int = 0  # linear warmup from lr/(warmup+1)
    batch_size: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: bf16 compute, fp32 master weights/state
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"fine-tuning steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"fine-tuning lr must be positive, got {self.lr}")
        if self.train not in TRAIN_SETS:
            raise ValueError(f"unknown fine-tuning train set {self.train!r}; choose from {', '.join(TRAIN_SETS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.batch_size < 1:
            raise ValueError("fine-tuning batch_size must be at least 1")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["autocast_dtype"] = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None
        d["betas"] = list(self.betas)
        return d


@dataclass
class FinetuneReport:
    steps: int
    losses: list[float]  # mean next-token loss of each step's batch (before the step)
    lrs: list[float]
    seconds: float
    tokens: int
    trained_parameters: int  # trainable entries that are not pruned
    frozen_pruned: int  # pruned entries kept at exactly 0
    state_bytes: int  # fp32 master copies + AdamW moments
    peak_gpu_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def pruning_masks(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: bool keep-mask}`` for the prunable linears' weights (pruned = exactly 0) and biases
    (pruned = 0 and the whole weight row 0)."""
    adapter = adapter or adapter_for(model)
    masks = {}
    for name, lin in prunable_linears(model, adapter).items():
        w = lin.weight.detach()
        masks[f"{name}.weight"] = w != 0
        if lin.bias is not None:
            masks[f"{name}.bias"] = (lin.bias.detach() != 0) | (w != 0).any(dim=1)
    return masks


@torch.no_grad()
def mask_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Number of entries that the masks say are pruned but are not exactly 0."""
    params = dict(model.named_parameters())
    return sum(int(torch.count_nonzero(params[n].detach()[~m.to(params[n].device)])) for n, m in masks.items())


def trainable_parameters(model: nn.Module, train: str, adapter: ArchitectureAdapter | None = None
                         ) -> dict[str, nn.Parameter]:
    """The parameters a fine-tuning run updates, by name (``train``: "linears", "norms" or "both")."""
    if train not in TRAIN_SETS:
        raise ValueError(f"unknown fine-tuning train set {train!r}; choose from {', '.join(TRAIN_SETS)}")
    adapter = adapter or adapter_for(model)
    out: dict[str, nn.Parameter] = {}
    if train in ("linears", "both"):
        for name, lin in prunable_linears(model, adapter).items():
            out[f"{name}.weight"] = lin.weight
            if lin.bias is not None:
                out[f"{name}.bias"] = lin.bias
    if train in ("norms", "both"):
        for mod_name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                continue
            for p_name, p in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return out


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0) -> float:
    """Multiplier of the base lr at 0-based ``step`` of ``total``: linear warmup, then constant/cosine/linear decay
    (the decays reach 0 after the last step)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = (step - warmup) / span
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Window indices of every step: seeded permutations of the ``n`` windows, one after another."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=generator).tolist()
    return [torch.tensor(order[s * batch_size : (s + 1) * batch_size]) for s in range(steps)]


@contextmanager
def _training(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode (no dropout: a seed fixes the run) with gradients for ``params`` only; always restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)


def _adamw(masters: dict[str, nn.Parameter], opts: FinetuneOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the fp32 masters; weight decay on matrices only."""
    decay = [m for n, m in masters.items() if m.dim() >= 2]
    no_decay = [m for n, m in masters.items() if m.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=opts.lr, betas=opts.betas, eps=opts.eps,
                             foreach=device.type == "cuda")


@torch.no_grad()
def _masked_step(params: dict[str, nn.Parameter], masters: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, opts: FinetuneOptions, step: int) -> float:
    """One optimizer step on the fp32 masters from the parameters' gradients; pruned entries get a zero gradient
    (so AdamW's moments stay 0) and are re-masked after the step. Returns the learning rate used."""
    for n, p in params.items():
        m = masters[n]
        if m is not p:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        if m.grad is not None and n in masks:
            m.grad.mul_(masks[n])
    if opts.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(masters.values()), opts.grad_clip)
    lr = opts.lr * lr_factor(step, opts.steps, opts.schedule, opts.warmup_steps)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for n, p in params.items():
        m = masters[n]
        if n in masks:
            m.mul_(masks[n])
        if m is not p:
            p.copy_(m.to(p.dtype))
    return lr


class _Best:
    """Validation during fine-tuning: the values so far and a host copy of the best evaluated parameters."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], validate):
        self.model, self.params, self.validate = model, params, validate
        self.validation: list[list[float]] = []
        self.value, self.step, self.state = None, None, None

    def check(self, step: int) -> None:
        if self.validate is None:
            return
        with torch.no_grad():
            value = float(self.validate(self.model))
        self.validation.append([step, value])
        if self.step is None or value < self.value:
            self.value, self.step = value, step
            self.state = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def restore(self, last_step: int) -> None:
        """Put the best evaluated parameters back unless they are the current ones (zeros stay zeros)."""
        if self.step is not None and self.step != last_step:
            for n, p in self.params.items():
                p.copy_(self.state[n].to(p.device))


def finetune(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    options: FinetuneOptions,
    adapter: ArchitectureAdapter | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    validate_every: int = 0,
) -> FinetuneReport:
    """Fine-tune ``model`` in place on the token ``windows`` (n, L), keeping every pruned weight exactly 0.

    ``on_step(step, loss, lr)`` is called after every optimizer step (1-based ``step``). Returns the loss curve,
    timing and memory. Deterministic for a seed on the CPU.

    ``validate(model) -> float`` (lower is better, e.g. the perplexity of held-out windows) is evaluated before the
    first step, every ``validate_every`` steps (0: only at the end) and after the last step; the trained parameters
    of the best evaluation (a host copy) are put back at the end, so fine-tuning never leaves the model worse on
    that measure than it found it — step 0, the untouched model, may win. ``report.extra`` gets ``validation``
    ([step, value] pairs) and ``best_step``.
    """
    opts = options
    if validate_every < 0:
        raise ValueError(f"validate_every must be >= 0, got {validate_every}")
    adapter = adapter or adapter_for(model)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError("fine-tuning needs a non-empty (n, L >= 2) tensor of token windows")
    device = torch.device(opts.device) if opts.device else next(model.parameters()).device
    params = trainable_parameters(model, opts.train, adapter)
    if not params:
        raise ValueError(f"nothing to fine-tune: the model has no {opts.train} parameters")
    all_masks = pruning_masks(model, adapter)
    masks = {n: all_masks[n].to(device) for n in params if n in all_masks}

    # fp32 masters: the parameter itself when it is fp32, else an fp32 copy (bf16/fp16 model on the GPU)
    masters = {n: (p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone()))
               for n, p in params.items()}
    optimizer = _adamw(masters, opts, device)
    plan = _batches(windows.shape[0], opts.batch_size, opts.steps, torch.Generator(device="cpu").manual_seed(opts.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, lrs = [], []
    tokens = 0
    best = _Best(model, params, validate)
    t0 = time.perf_counter()
    with _training(model, params):
        best.check(0)
        for step, idx in enumerate(plan):
            batch = windows[idx].to(device)
            with torch.autocast(device.type, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None):
                loss = sequence_nll(model, batch).sum() / (batch.shape[0] * (batch.shape[1] - 1))
            loss.backward()
            lr = _masked_step(params, masters, masks, optimizer, opts, step)
            losses.append(float(loss.detach()))
            lrs.append(lr)
            tokens += batch.numel()
            if on_step is not None:
                on_step(step + 1, losses[-1], lr)
            if step + 1 == len(plan) or (validate_every and (step + 1) % validate_every == 0):
                best.check(step + 1)
        best.restore(len(plan))
    seconds = time.perf_counter() - t0
    state_bytes = sum(m.numel() * 4 * (2 if m is params[n] else 3) for n, m in masters.items())
    pruned = sum(int((~m).sum()) for m in masks.values())
    trained = sum(p.numel() for p in params.values()) - pruned
    extra = {"validation": best.validation, "best_step": best.step} if best.step is not None else {}
    return FinetuneReport(steps=opts.steps, losses=losses, lrs=lrs, seconds=seconds, tokens=tokens,
                          trained_parameters=trained, frozen_pruned=pruned, state_bytes=state_bytes,
                          peak_gpu_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda"
                          else None, extra=extra)
