"""Tiny randomly initialised causal LMs built from configs (no network, seconds on the CPU)."""

from __future__ import annotations

import torch

VOCAB = 128


def tiny_config(family: str, **overrides):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    if family == "llama":  # GQA: 4 query heads, 2 key/value heads
        cfg = LlamaConfig(**common)
    elif family == "llama_mha":  # no GQA: one key/value head per query head
        cfg = LlamaConfig(**{**common, "num_key_value_heads": 4})
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "mistral_swa":  # a sliding window shorter than the tiny windows
        cfg = MistralConfig(**common, sliding_window=8)
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
    elif family == "qwen3":  # q/k norms over head_dim, head_dim independent of hidden / heads
        cfg = Qwen3Config(**common, head_dim=24)
    elif family == "gemma2":  # head_dim independent, pre/post norms, sliding + full layers, soft-capping, tied
        cfg = Gemma2Config(**{**common, "num_hidden_layers": 3}, head_dim=24, query_pre_attn_scalar=24,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif family == "gemma3":  # as Gemma 2 with q/k norms and two rope bases, no soft-capping
        cfg = Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=24, query_pre_attn_scalar=24,
                               sliding_window=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
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
# every family with its own adapter or layout (the per-family test matrix)
ALL_FAMILIES = ("llama", "llama_mha", "mistral", "mistral_swa", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt")


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


def coupled_pruned(family: str, seed: int = 0):
    """A tiny model pruned with coupled structure to 60% size, heads 1 and 3 of layer 0 and (GQA) the whole second
    kv group of layer 1 zeroed too: a model with whole units to drop (materialization, structure reports)."""
    from surgeon_core import PruneOptions, adapter_for
    from surgeon_core.adapters import get_submodule

    model = tiny_model(family, seed=seed)
    prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled"), target_size=0.6)
    ad = adapter_for(model)
    nh, nkv, hd = ad.head_layout(model.config)
    with torch.no_grad():
        layers = get_submodule(model, ad.layers)
        for h in (1, 3):
            get_submodule(layers[0], ad.attention_out).weight[:, h * hd: (h + 1) * hd] = 0
        if nkv < nh:
            get_submodule(layers[1], ad.attention_out).weight[:, nh // 2 * hd:] = 0
    return model


def empty_ffn(model, layer: int = 1):
    """Zero every FFN unit of one decoder layer (its consumer columns), as a pruning run that removed them all."""
    from surgeon_core import adapter_for
    from surgeon_core.adapters import get_submodule

    ad = adapter_for(model)
    with torch.no_grad():
        get_submodule(get_submodule(model, ad.layers)[layer], ad.mlp_out).weight.zero_()
    return model


def overflowing_model(scale: float):
    """A tiny Llama whose first MLP is scaled so that its output overflows fp16 (max 65504), not fp32."""
    model = tiny_model("llama")
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight.mul_(scale)
        mlp.down_proj.weight.mul_(scale)
    return model


def rank_deficient_setup():
    """16 calibration tokens for 64-wide inputs: the input factors have rank <= 16, so with a tiny damping only exact
    (fp32) Gram matrices stay positive definite, not ones whose entries were rounded to bf16."""
    opts = dict(method="llm-surgeon", structure="unstructured", damping_a=1e-5, damping_g=1e-5)
    return tiny_windows(2, 8), opts


def shot_pruned(family="llama", structure="structured", size=0.6, seed=0):
    """A tiny model after one LLM Surgeon shot to ``size`` (its zeros are the masks fine-tuning must keep)."""
    from surgeon_core.methods import PruneOptions
    from surgeon_core.shot import prune_shot

    model = tiny_model(family, seed=seed)
    opts = PruneOptions(structure=structure, max_correlate=None if structure == "structured" else 128)
    prune_shot(model, tiny_windows(4, 16, seed=1), options=opts, target_size=size)
    return model
