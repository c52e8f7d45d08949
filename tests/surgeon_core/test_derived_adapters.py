"""Adapters derived from module names for model types without a table entry (OLMo 2: q/k/v/o + gate/up/down; GLM:
fused gate_up_proj), verified on a forward pass; one clear error for a layout that cannot be derived (GPT-2,
StarCoder2), a model whose shapes contradict its config, and a mixture of experts (Mixtral, Qwen2-MoE)."""

import pytest
import torch

from surgeon_core.adapters import ADAPTERS, UnsupportedArchitectureError, adapter_for, moe_reason
from surgeon_core.shot import PruneOptions
from tiny_models import VOCAB, prune, tiny_windows

pytestmark = pytest.mark.unit

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256)


def _model(config_name: str, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(**{**COMMON, **kw})
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_unlisted_llama_like_type_gets_a_derived_adapter():
    model = _model("Olmo2Config")
    assert all("olmo2" not in a.model_types for a in ADAPTERS)
    ad = adapter_for(model)
    assert ad.derived and ad.family == "derived:olmo2" and ad.layers == "model.layers"
    assert ad.attention_in == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert ad.mlp_in == ("mlp.gate_proj", "mlp.up_proj") and ad.mlp_out == "mlp.down_proj"
    assert ad.head_layout(model.config) == (4, 2, 16)
    assert adapter_for(model) is ad  # verified once per model
    reports = prune(model, tiny_windows(4, 16), options=PruneOptions(structure="coupled"), target_size=0.7)
    assert abs(reports[-1].achieved_size - 0.7) <= 0.01


@pytest.mark.heavy
def test_derived_fused_gate_up():
    model = _model("GlmConfig", pad_token_id=0, head_dim=16)
    ad = adapter_for(model)
    assert ad.mlp_in == ("mlp.gate_up_proj",) and ad.mlp_halves == 2
    reports = prune(model, tiny_windows(4, 16), options=PruneOptions(structure="2:4", max_correlate=64),
                    target_size=0.5)
    assert abs(reports[-1].achieved_size - 0.5) <= 0.01


@pytest.mark.parametrize("config_name,missing", [
    ("GPT2Config", "no decoder layers"),
    ("Starcoder2Config", "no MLP with linears gate_proj/up_proj/down_proj"),
])
def test_underivable_layout_names_what_is_missing(config_name, missing):
    kw = dict(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64) if config_name == "GPT2Config" else {}
    if kw:
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(**kw))
    else:
        model = _model(config_name)
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(model)
    msg = str(err.value)
    assert f"unsupported architecture '{model.config.model_type}'" in msg and "no adapter" in msg
    assert missing in msg and err.value.reason in msg


def test_shapes_that_contradict_the_config_are_refused():
    model = _model("Olmo2Config")
    model.config.num_key_value_heads = 4  # k_proj has 2 heads' rows
    with pytest.raises(UnsupportedArchitectureError, match="'self_attn.k_proj' has out_features=32, expected 64"):
        adapter_for(model)


@pytest.mark.parametrize("config_name,reason", [("MixtralConfig", "num_local_experts=4"),
                                                ("Qwen2MoeConfig", "num_experts=4")])
def test_mixture_of_experts_is_refused(config_name, reason):
    kw = {"num_local_experts": 4} if config_name == "MixtralConfig" else {"num_experts": 4}
    model = _model(config_name, **kw)
    assert moe_reason(model.config) == reason
    with pytest.raises(UnsupportedArchitectureError, match=f"mixture-of-experts model .*{reason}"):
        adapter_for(model)


def test_dense_config_is_no_mixture():
    from transformers import LlamaConfig, Qwen2MoeConfig

    assert moe_reason(LlamaConfig(**COMMON)) is None
    assert moe_reason(Qwen2MoeConfig(**COMMON, num_experts=1)) == "model type 'qwen2_moe'"
