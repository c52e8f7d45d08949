"""Mask-preserving fine-tuning of a pruned model (no adapters): the surviving weights are trained directly.

The paper interleaves low-rank (LoRA) first-order corrections between shots (paper §3.6); the reference
code's LoRA path never runs. Here the remaining weights themselves are trained with AdamW (objectives below), and
every pruned weight (exactly 0 when training starts) stays exactly 0:

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

Objective (``loss``): ``"ce"`` the next-token loss, ``"kd"`` the KL divergence from the dense model's next-token
distribution (:func:`teacher_targets`, computed once before pruning changes the model), ``"mix"``
(1 - kd_weight)·CE + kd_weight·KL. Validated stopping: :func:`validation_split` carves held-out windows that share
no tokens with the training windows; ``finetune(validate=...)`` evaluates them before the first step and every
``validate_every`` steps, stops after ``patience`` evaluations without a new best, and puts back the best evaluated
weights, the untouched model included (the guard: no improvement, no change).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import ArchitectureAdapter, adapter_for, prunable_linears
from .lm import hidden_states, sequence_nll

__all__ = ["FinetuneOptions", "FinetuneReport", "TeacherTargets", "pruning_masks", "mask_violations",
           "trainable_parameters", "lr_factor", "finetune", "teacher_targets", "distillation_loss",
           "overlap_groups", "validation_split", "sample_windows"]

TRAIN_SETS = ("linears", "norms", "both")
SCHEDULES = ("constant", "cosine", "linear")
LOSSES = ("ce", "kd", "mix")


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
    loss: str = "ce"  # "ce" (next token) | "kd" (KL to the teacher) | "mix"
    kd_weight: float = 0.5  # "mix": (1 - kd_weight) * CE + kd_weight * KL

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
        if self.loss not in LOSSES:
            raise ValueError(f"unknown fine-tuning loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["autocast_dtype"] = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None
        d["betas"] = list(self.betas)
        return d


@dataclass
class FinetuneReport:
    steps: int  # steps run (fewer than planned when validation stopped the run early)
    losses: list[float]  # mean training objective of each step's batch (before the step)
    lrs: list[float]
    seconds: float
    tokens: int
    trained_parameters: int  # trainable entries that are not pruned
    frozen_pruned: int  # pruned entries kept at exactly 0
    state_bytes: int  # fp32 master copies + AdamW moments
    peak_gpu_bytes: int | None = None
    planned_steps: int | None = None
    loss: str = "ce"
    validation: list[list[float]] = field(default_factory=list)  # [step, held-out loss]; step 0 = before training
    best_step: int | None = None  # the step whose weights were kept (0: the weights from before fine-tuning)
    stopped_early: bool = False  # ``patience`` evaluations without a new best ended the run
    kept_pre_finetune: bool = False  # validation never went below its value before fine-tuning: weights unchanged
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TeacherTargets:
    """The dense model's next-token distribution at every predicted position of some windows, as ``k`` + 1 buckets:
    its ``k`` most likely tokens and the rest of the vocabulary as one.

    ``logp`` (n, L-1, k+1) float32: log-probabilities of the top-k tokens, then of the tail; ``index`` (n, L-1, k)
    int32: the top-k token ids. Row i belongs to window i of the windows it was computed on."""

    logp: torch.Tensor
    index: torch.Tensor

    def __post_init__(self) -> None:
        if self.logp.dim() != 3 or self.index.shape != (*self.logp.shape[:2], self.logp.shape[2] - 1):
            raise ValueError("teacher targets need logp (n, L-1, k+1) and index (n, L-1, k)")

    @property
    def nbytes(self) -> int:
        return self.logp.numel() * self.logp.element_size() + self.index.numel() * self.index.element_size()

    def rows(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logp[idx].to(device), self.index[idx].to(device).long()


def _bucket_logp(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log-probabilities (…, k+1) of the k tokens ``index`` and of all other tokens together, from (…, V) logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.gather(-1, index)
    tail = torch.logsumexp(logp.scatter(-1, index, -math.inf), dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: torch.Tensor, *, k: int = 64, batch_size: int = 1,
                    device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                    chunk_tokens: int = 1024) -> TeacherTargets:
    """The (dense) ``model``'s next-token distribution on ``windows`` (n, L), kept as top-``k`` + tail buckets."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError("teacher targets need a non-empty (n, L >= 2) tensor of token windows")
    if k < 1:
        raise ValueError(f"teacher top-k must be at least 1, got {k}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    head = model.get_output_embeddings()
    k = min(k, head.weight.shape[0] - 1)
    n, L = windows.shape
    # top-k + tail instead of full log-probs: (k+1)·4 + k·4 bytes a token instead of V·4 (49152 -> 64: 380x
    # smaller), and the bucketed KL is 0 iff student and teacher agree on the buckets and never exceeds the full KL
    logp = torch.empty(n, L - 1, k + 1, dtype=torch.float32)
    index = torch.empty(n, L - 1, k, dtype=torch.int32)
    was_training = model.training
    model.eval()
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            h = hidden_states(model, batch)[:, :-1]
        step = max(1, chunk_tokens // batch.shape[0])
        for s in range(0, L - 1, step):
            logits = head(h[:, s : s + step]).float()
            top = logits.topk(k, dim=-1).indices
            logp[i : i + batch.shape[0], s : s + step] = _bucket_logp(logits, top).cpu()
            index[i : i + batch.shape[0], s : s + step] = top.to(torch.int32).cpu()
    model.train(was_training)
    return TeacherTargets(logp, index)


@torch.no_grad()
def sample_windows(model: nn.Module, starts: torch.Tensor, seqlen: int, *, batch_size: int = 8, seed: int = 0,
                   device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(n, ``seqlen``) windows of text sampled from ``model``'s own next-token distribution, each continuing its
    start token in ``starts`` (n,): training text for distillation that needs no other corpus. Plain ancestral
    sampling with the key/value cache: temperature 1, no top-k/top-p truncation, and no stop at an end-of-text token
    (``generate`` would stop there, or with a minimum length forbid it); batch ``i // batch_size`` draws from a
    generator seeded ``seed * 1_000_003 + i``, so a seed and a batch size fix the windows."""
    if starts.dim() != 1 or starts.numel() == 0 or seqlen < 2:
        raise ValueError("sampling needs a non-empty 1-D tensor of start tokens and seqlen >= 2")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, out = starts.numel(), []
    try:
        for i in range(0, n, batch_size):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            tokens = [starts[i : i + batch_size, None].to(device)]
            cache: dict = {}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                while len(tokens) < seqlen:
                    step = model(input_ids=tokens[-1], use_cache=True, **cache)
                    # the key/value cache goes back under the name this transformers version gives it
                    name = "cache" if "cache" in step.keys() else "past_key_values"
                    cache = {name: step[name]}
                    probs = torch.softmax(step.logits[:, -1].float(), dim=-1)
                    tokens.append(torch.multinomial(probs, 1, generator=gen))
            out.append(torch.cat(tokens, dim=1).cpu())
            if progress is not None:
                progress(min(i + batch_size, n), n)
    finally:
        model.train(was_training)
    return torch.cat(out)


def _kd_chunk(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, t_logp: torch.Tensor,
              t_index: torch.Tensor) -> torch.Tensor:
    """(2, B): summed next-token NLL and summed bucketed KL(teacher || student) per sequence of one chunk."""
    logits = head(h).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    s_logp = _bucket_logp(logits, t_index)
    p = t_logp.exp()
    kl = torch.where(p > 0, p * (t_logp - s_logp), torch.zeros_like(p)).sum(-1)
    return torch.stack([nll.sum(1), kl.sum(1)])


def distillation_loss(model: nn.Module, batch: torch.Tensor, t_logp: torch.Tensor, t_index: torch.Tensor, *,
                      chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL and mean bucketed KL(teacher || student) per predicted token of ``batch`` (B, L),
    against teacher rows ``t_logp`` (B, L-1, k+1), ``t_index`` (B, L-1, k). The vocabulary head runs in chunks of
    ``chunk_tokens`` (checkpointed under autograd), so (B, L, V) logits never exist at once."""
    head = model.get_output_embeddings()
    h = hidden_states(model, batch)[:, :-1]
    targets = batch[:, 1:]
    step = max(1, chunk_tokens // batch.shape[0])
    total = torch.zeros(2, batch.shape[0], device=h.device)
    for s in range(0, h.shape[1], step):
        args = (head, h[:, s : s + step], targets[:, s : s + step], t_logp[:, s : s + step], t_index[:, s : s + step])
        if torch.is_grad_enabled() and h.shape[1] > step:
            total = total + checkpoint(_kd_chunk, *args, use_reentrant=False)
        else:
            total = total + _kd_chunk(*args)
    per_token = total.sum(1) / targets.numel()
    return per_token[0], per_token[1]


def overlap_groups(windows: torch.Tensor, min_overlap: int = 8) -> list[list[int]]:
    """Windows (n, L) grouped so that any two that may come from overlapping stretches of one token sequence are in
    the same group: i and j are linked when the last m tokens of one equal the first m of the other for some
    m >= ``min_overlap`` (two windows of one sequence that share m tokens always are; so are equal windows). The
    default 8 ignores chance repeats of a few tokens at window edges, which in text link unrelated windows.

    Suffix/prefix equality is found with polynomial hashes of every prefix and suffix and confirmed token by token;
    groups are the connected components, each listed in index order, groups ordered by their first window."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError("overlap_groups needs a non-empty (n, L) tensor of token windows")
    n, L = windows.shape
    mod, base = 2_147_483_647, 1_000_003  # products stay below 2**62: exact in int64
    x = windows.long().cpu() % mod
    prefix = torch.zeros(n, L + 1, dtype=torch.int64)
    powers = torch.ones(L + 1, dtype=torch.int64)
    for t in range(L):
        prefix[:, t + 1] = (prefix[:, t] * base + x[:, t]) % mod
        powers[t + 1] = powers[t] * base % mod
    m = torch.arange(1, L + 1)
    suffix = (prefix[:, L : L + 1] - prefix[:, L - m] * powers[m] % mod) % mod  # (n, L): hash of the last m tokens
    pre = prefix[:, 1:]  # (n, L): hash of the first m tokens
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    lo = max(1, min_overlap) - 1
    for i in range(n):
        hits = (suffix[i, None, lo:] == pre[:, lo:]).nonzero().tolist()  # (j, m - 1 - lo)
        for j, c in hits:
            length = c + lo + 1
            if j != i and find(i) != find(j) and torch.equal(windows[i, L - length :], windows[j, :length]):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def validation_split(windows: torch.Tensor, n_val: int, min_overlap: int = 8) -> tuple[list[int], list[int]]:
    """(training, validation) window indices: about ``n_val`` validation windows taken from the end, whole
    :func:`overlap_groups` at a time, so no validation window shares tokens with a training window. A group too
    large for the places left is skipped; fewer than ``n_val`` come back when the groups do not fit."""
    n = windows.shape[0]
    if not 0 < n_val < n:
        raise ValueError(f"validation needs between 1 and {n - 1} of {n} windows, asked for {n_val}")
    val: list[int] = []
    for group in sorted(overlap_groups(windows, min_overlap), key=lambda g: -g[-1]):
        if len(val) + len(group) <= n_val and len(group) < n:
            val += group
        if len(val) == n_val:
            break
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], sorted(val)


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
    """Validation during fine-tuning: the values so far, a host copy of the best evaluated parameters and the
    count of evaluations since the last new best."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], validate):
        self.model, self.params, self.validate = model, params, validate
        self.validation: list[list[float]] = []
        self.value, self.step, self.state = None, None, None
        self.since_best = 0

    def check(self, step: int) -> None:
        if self.validate is None:
            return
        with torch.no_grad():
            value = float(self.validate(self.model))
        self.validation.append([step, value])
        if self.step is None or value < self.value:  # strictly lower: a tie keeps the earlier (untouched) weights
            self.value, self.step, self.since_best = value, step, 0
            self.state = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        else:
            self.since_best += 1

    @torch.no_grad()
    def restore(self, last_step: int) -> None:
        """Put the best evaluated parameters back unless they are the current ones (zeros stay zeros)."""
        if self.step is not None and self.step != last_step:
            for n, p in self.params.items():
                p.copy_(self.state[n].to(p.device))


def _check_finetune_inputs(windows: torch.Tensor, opts: FinetuneOptions, teacher: TeacherTargets | None,
                           validate_every: int, patience: int) -> None:
    if validate_every < 0:
        raise ValueError(f"validate_every must be >= 0, got {validate_every}")
    if patience < 0:
        raise ValueError(f"patience must be >= 0, got {patience}")
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError("fine-tuning needs a non-empty (n, L >= 2) tensor of token windows")
    if opts.loss != "ce" and opts.steps:
        if teacher is None:
            raise ValueError(f"fine-tuning loss {opts.loss!r} needs the teacher's targets (teacher_targets)")
        if teacher.logp.shape[:2] != (windows.shape[0], windows.shape[1] - 1):
            raise ValueError(f"teacher targets cover {tuple(teacher.logp.shape[:2])} positions, the windows "
                             f"{(windows.shape[0], windows.shape[1] - 1)}")


def _fp32_masters(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The parameter itself when it is fp32, else an fp32 copy (bf16/fp16 model on the GPU)."""
    return {n: (p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())) for n, p in params.items()}


def _step_loss(model: nn.Module, batch: torch.Tensor, idx, opts: FinetuneOptions, teacher: TeacherTargets | None,
               device: torch.device) -> torch.Tensor:
    """The objective of one step: mean next-token loss (ce), KL to the teacher (kd) or their mix."""
    with torch.autocast(device.type, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None):
        if opts.loss == "ce":
            return sequence_nll(model, batch).sum() / (batch.shape[0] * (batch.shape[1] - 1))
        ce, kl = distillation_loss(model, batch, *teacher.rows(idx, device))
        return kl if opts.loss == "kd" else (1 - opts.kd_weight) * ce + opts.kd_weight * kl


def finetune(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    options: FinetuneOptions,
    adapter: ArchitectureAdapter | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    validate_every: int = 0,
    patience: int = 0,
    teacher: TeacherTargets | None = None,
    on_validate: Callable[[int, float], None] | None = None,
) -> FinetuneReport:
    """Fine-tune ``model`` in place on the token ``windows`` (n, L), keeping every pruned weight exactly 0.

    ``on_step(step, loss, lr)`` is called after every optimizer step (1-based ``step``). Returns the loss curve,
    timing and memory. Deterministic for a seed on the CPU. ``teacher`` (rows matching ``windows``) is needed by
    the ``kd`` and ``mix`` objectives.

    ``validate(model) -> float`` (lower is better, e.g. the loss on held-out windows) is evaluated before the
    first step, every ``validate_every`` steps (0: only at the end) and after the last step, each value passed to
    ``on_validate(step, value)``; ``patience`` > 0 ends the run after that many evaluations in a row without a new
    best. The trained parameters of the best evaluation (a host copy) are put back at the end, so fine-tuning never
    leaves the model worse on that measure than it found it: when no evaluation goes below step 0's, the weights
    from before fine-tuning are restored exactly (``report.kept_pre_finetune``).
    """
    opts = options
    _check_finetune_inputs(windows, opts, teacher, validate_every, patience)
    adapter = adapter or adapter_for(model)
    device = torch.device(opts.device) if opts.device else next(model.parameters()).device
    params = trainable_parameters(model, opts.train, adapter)
    if not params:
        raise ValueError(f"nothing to fine-tune: the model has no {opts.train} parameters")
    all_masks = pruning_masks(model, adapter)
    masks = {n: all_masks[n].to(device) for n in params if n in all_masks}

    masters = _fp32_masters(params)
    optimizer = _adamw(masters, opts, device)
    plan = _batches(windows.shape[0], opts.batch_size, opts.steps, torch.Generator(device="cpu").manual_seed(opts.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, lrs = [], []
    tokens = 0
    best = _Best(model, params, validate)
    t0 = time.perf_counter()
    stopped = False

    def check(step: int) -> None:
        best.check(step)
        if on_validate is not None and best.validation and best.validation[-1][0] == step:
            on_validate(step, best.validation[-1][1])

    with _training(model, params):
        check(0)
        for step, idx in enumerate(plan):
            batch = windows[idx].to(device)
            loss = _step_loss(model, batch, idx, opts, teacher, device)
            loss.backward()
            lr = _masked_step(params, masters, masks, optimizer, opts, step)
            losses.append(float(loss.detach()))
            lrs.append(lr)
            tokens += batch.numel()
            if on_step is not None:
                on_step(step + 1, losses[-1], lr)
            if step + 1 == len(plan) or (validate_every and (step + 1) % validate_every == 0):
                check(step + 1)
                if patience and best.since_best >= patience and step + 1 < len(plan):
                    stopped = True
                    break
        best.restore(len(losses))
    seconds = time.perf_counter() - t0
    state_bytes = sum(m.numel() * 4 * (2 if m is params[n] else 3) for n, m in masters.items())
    pruned = sum(int((~m).sum()) for m in masks.values())
    trained = sum(p.numel() for p in params.values()) - pruned
    extra = {"teacher_bytes": teacher.nbytes} if teacher is not None and opts.loss != "ce" else {}
    return FinetuneReport(steps=len(losses), losses=losses, lrs=lrs, seconds=seconds, tokens=tokens,
                          trained_parameters=trained, frozen_pruned=pruned, state_bytes=state_bytes,
                          peak_gpu_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda"
                          else None, planned_steps=opts.steps, loss=opts.loss, validation=best.validation,
                          best_step=best.step, stopped_early=stopped, kept_pre_finetune=best.step == 0, extra=extra)
