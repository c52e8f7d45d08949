"""The architecture adapter table on tiny random models of every supported family."""

import pytest
from torch import nn

from surgeon_core.adapters import UnsupportedArchitectureError, adapter_for, get_submodule, prunable_linears
from tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.unit

EXPECTED = {  # family -> (adapter family, linears per block, (heads, kv heads, head dim))
    "llama": ("llama", 7, (4, 2, 16)),
    "mistral": ("llama", 7, (4, 2, 16)),
    "qwen2": ("llama", 7, (4, 2, 16)),
    "opt": ("opt", 6, (4, 4, 16)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_an_adapter(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    fam, per_block, heads = EXPECTED[family]
    assert adapter.family == fam
    assert len(adapter.linears) == per_block
    assert adapter.head_layout(model.config) == heads

    linears = prunable_linears(model, adapter)
    n_layers = model.config.num_hidden_layers
    assert len(linears) == n_layers * per_block
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert all(name.startswith(adapter.layers + ".") for name in linears)
    # embeddings and the vocabulary head are never prunable
    head = model.get_output_embeddings()
    assert all(m is not head for m in linears.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_and_couplings_name_prunable_linears(family):
    adapter = adapter_for(tiny_model(family))
    flat = [name for group in adapter.input_groups for name in group]
    assert sorted(flat) == sorted(adapter.linears)  # the input groups partition the linears
    for producers, consumer in adapter.couplings:
        assert consumer in adapter.linears and set(producers) <= set(adapter.linears)
    assert set(adapter.attention_in) | {adapter.attention_out} | set(adapter.mlp_in) | {adapter.mlp_out} \
        == set(adapter.linears)


def test_gqa_shapes_match_head_layout():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    n_heads, n_kv, head_dim = adapter.head_layout(model.config)
    layer = get_submodule(model, adapter.layers)[0]
    assert get_submodule(layer, "self_attn.q_proj").out_features == n_heads * head_dim
    assert get_submodule(layer, "self_attn.k_proj").out_features == n_kv * head_dim
    assert get_submodule(layer, "self_attn.v_proj").out_features == n_kv * head_dim


def test_unsupported_architecture_names_the_type():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                        n_positions=64))
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(model)
    msg = str(err.value)
    assert "gpt2" in msg and "no adapter" in msg and "llama" in msg


def test_missing_linear_is_named():
    model = tiny_model("llama")
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(UnsupportedArchitectureError, match="mlp.gate_proj"):
        adapter_for(model)


def test_missing_layers_are_named():
    model = tiny_model("opt")
    del model.model.decoder.layers
    with pytest.raises(UnsupportedArchitectureError, match="model.decoder.layers"):
        adapter_for(model)
