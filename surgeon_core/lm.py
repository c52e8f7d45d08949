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


def _chunk_nll(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (B, l, V) fp32 for a stable log-softmax
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
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

