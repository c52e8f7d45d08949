"""Next-token losses for causal LMs without materialising full-vocabulary logits for a whole batch.

The model object only needs ``base_model`` (returns ``last_hidden_state``) and ``get_output_embeddings()``,
which every Hugging Face causal LM has; nothing here imports transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["hidden_states", "sequence_nll", "sample_labels"]


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, L, D) of the decoder, before the vocabulary head."""
    out = model.base_model(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class _SoftmaxNLL(torch.autograd.Function):
    """Per-token NLL of (N, V) logits, with its gradient formed in the forward pass, one block of rows at a time.

    Bit for bit the values of ``F.cross_entropy(logits.float(), targets, reduction="none")``, and its gradient for a
    summed loss (the curvature pass; each block goes through the same log-softmax kernels, forward and backward;
    other upstream gradients are applied to the stored one, one more rounding), without its (N, V) fp32 tensors: the
    gradient is kept in the logits' dtype, the dtype autograd hands the vocabulary head's backward anyway (bf16
    under autocast), and the blocks stay small enough for the allocator to reuse them."""

    ROWS = 128  # rows per fp32 block (25 MB at a 49k vocabulary)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        work = torch.promote_types(logits.dtype, torch.float32)  # fp32, or float64 for float64 logits
        nll = torch.empty(n, dtype=work, device=logits.device)
        d = torch.empty_like(logits)
        for s in range(0, n, _SoftmaxNLL.ROWS):
            logp = torch.log_softmax(logits[s : s + _SoftmaxNLL.ROWS].to(work), dim=1)
            t = targets[s : s + _SoftmaxNLL.ROWS, None]
            nll[s : s + _SoftmaxNLL.ROWS] = -logp.gather(1, t).squeeze(1)
            upstream = torch.zeros_like(logp).scatter_(1, t, -1.0)  # d nll / d logp for an upstream gradient of 1
            d[s : s + _SoftmaxNLL.ROWS] = torch._log_softmax_backward_data(upstream, logp, 1, work)
        ctx.save_for_backward(d)
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (d,) = ctx.saved_tensors
        if bool((grad == 1).all()):  # a summed loss: the stored gradient as it is
            return d, None
        return d * grad.to(d.dtype)[:, None], None


def _chunk_nll(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h)  # (B, l, V)
    if torch.is_grad_enabled() and logits.requires_grad:
        nll = _SoftmaxNLL.apply(logits.flatten(0, 1), targets.flatten())
    else:  # evaluation: fp32 for a stable log-softmax
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view(targets.shape).sum(dim=1)  # (B,)


def sequence_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Summed next-token NLL per sequence, shape (B,), over positions 1..L-1.

    ``labels`` (B, L-1) replaces the true next tokens (sampled-label Fisher). With autograd on and more than one
    chunk of ``chunk_tokens``, each chunk of the vocabulary head is checkpointed, so the (B, L, V) logits are never
    all alive at once.
    """
    head = model.get_output_embeddings()
    h = hidden_states(model, input_ids)[:, :-1]  # (B, L-1, D)
    targets = input_ids[:, 1:] if labels is None else labels  # (B, L-1)
    total = torch.zeros(input_ids.shape[0], device=h.device, dtype=torch.float32)
    step = max(1, chunk_tokens // max(1, input_ids.shape[0]))
    chunked = h.shape[1] > step  # one chunk: nothing to save by recomputing it in the backward pass
    for s in range(0, h.shape[1], step):
        hs, ts = h[:, s : s + step], targets[:, s : s + step]
        if torch.is_grad_enabled() and chunked:
            total = total + checkpoint(_chunk_nll, head, hs, ts, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, hs, ts)
    return total


@torch.no_grad()
def sample_labels(model: nn.Module, input_ids: torch.Tensor, *,
                  generator: torch.Generator | list[torch.Generator] | None = None,
                  chunk_tokens: int = 1024) -> torch.Tensor:
    """Labels (B, L-1) drawn from the model's own next-token distribution (for the true/sampled Fisher).

    ``generator``: one for the whole batch, or a list with one per sequence (draws then do not depend on which
    sequences share a batch)."""
    head = model.get_output_embeddings()
    h = hidden_states(model, input_ids)[:, :-1]
    out = []
    step = max(1, chunk_tokens // max(1, input_ids.shape[0]))
    for s in range(0, h.shape[1], step):
        probs = torch.softmax(head(h[:, s : s + step]).float(), dim=-1)
        B, l, V = probs.shape
        if isinstance(generator, (list, tuple)):
            draws = torch.stack([torch.multinomial(probs[b].to(g.device), 1, generator=g).view(l)
                                 for b, g in enumerate(generator)])
        else:
            gen_device = generator.device if generator is not None else probs.device
            draws = torch.multinomial(probs.view(-1, V).to(gen_device), 1, generator=generator).view(B, l)
        out.append(draws.to(input_ids.device))
    return torch.cat(out, dim=1)

