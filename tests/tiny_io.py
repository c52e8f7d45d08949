"""Offline test fixtures for I/O: a tiny trained tokenizer (vocab 128) and tiny saved model folders."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import VOCAB, tiny_model

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A pruned network keeps most of its accuracy.",
    "Pruning removes weights from a neural network while keeping its loss low.",
    "Language models predict the next token; perplexity measures how surprised they are.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-=",
]

TEXT = (
    "Surgery on language models removes structure while keeping the loss low.\n"
    "The curvature of the loss tells which weights matter.\n"
    "\n"
    "Windows of tokens are cut without overlap, and the remainder is dropped.\n"
) * 20


def tiny_tokenizer():
    """A byte-free BPE tokenizer with exactly VOCAB tokens, trained on CORPUS (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "<s>", "</s>"], limit_alphabet=80,
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    assert tk.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def save_tiny(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model + tiny tokenizer as a HF folder at ``path``."""
    from surgeon.models import save_model

    model = tiny_model(family, seed=seed)
    save_model(model, tiny_tokenizer(), path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
