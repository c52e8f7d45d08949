"""Tiny randomly initialised causal LMs built from configs (no network, seconds on the CPU)."""

from __future__ import annotations

import torch

VOCAB = 128


def tiny_config(family: str, **overrides):
    from transformers import (LlamaConfig, MistralConfig, OPTConfig, Qwen2Config)

    if family == "llama":  # GQA: 4 query heads, 2 key/value heads
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    elif family == "mistral":
        cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                            sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    elif family == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=64)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def tiny_windows(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


FAMILIES = ("llama", "mistral", "qwen2", "opt")


def prune(model, windows, *, options, target_size: float, num_shots: int = 1, on_shot=None, progress=None):
    """Every step of the plan in memory (the shape of the runner's loop, without its I/O)."""
    from surgeon_core.schedule import plan
    from surgeon_core.shot import run_step

    reports = []
    for step in plan(target_size, num_shots, layerwise=options.layerwise):
        reports.append(run_step(model, windows, options=options, step=step, progress=progress))
        if on_shot:
            on_shot(reports[-1])
    return reports
