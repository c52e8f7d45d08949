"""Modelling code for materialized (per-layer smaller) Llama-like and OPT models written by ``surgeon materialize``.

Stock transformers configs have one intermediate size and one head count for all layers. These subclasses build
the stock model, then shrink each decoder layer to ``intermediate_sizes[i]``, ``layer_num_heads[i]`` and
``layer_num_kv_heads[i]`` (head_dim unchanged), so the saved safetensors load with matching shapes.

Self-contained (imports only torch and transformers): ``surgeon materialize`` copies this file into the output
folder and points ``auto_map`` in config.json at it, so the folder loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` offline; importing
``surgeon.materialized_export`` registers the classes so ``trust_remote_code`` is not needed then.
"""

from __future__ import annotations

import warnings

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


class _PerLayerSizes:
    def _init_sizes(self, intermediate_sizes, layer_num_heads, layer_num_kv_heads):
        self.intermediate_sizes = list(intermediate_sizes) if intermediate_sizes is not None else None
        self.layer_num_heads = list(layer_num_heads) if layer_num_heads is not None else None
        self.layer_num_kv_heads = list(layer_num_kv_heads) if layer_num_kv_heads is not None else None


class SurgeonPrunedLlamaConfig(LlamaConfig, _PerLayerSizes):
    model_type = "surgeon_pruned_llama"

    def __init__(self, intermediate_sizes=None, layer_num_heads=None, layer_num_kv_heads=None, **kwargs):
        self._init_sizes(intermediate_sizes, layer_num_heads, layer_num_kv_heads)
        super().__init__(**kwargs)


class SurgeonPrunedOPTConfig(OPTConfig, _PerLayerSizes):
    model_type = "surgeon_pruned_opt"

    def __init__(self, intermediate_sizes=None, layer_num_heads=None, layer_num_kv_heads=None, **kwargs):
        self._init_sizes(intermediate_sizes, layer_num_heads, layer_num_kv_heads)
        super().__init__(**kwargs)


def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    with warnings.catch_warnings():  # zero-width FFN: "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(n_in, n_out, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


class _EmptyMLP(nn.Module):
    """A Llama-like FFN with no unit left (intermediate size 0): its output is exactly zero, so it returns a zero
    scalar without any work; the zero-width linears stay as children (same state-dict keys)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(())


def _shrink(layers, config, *, attn: str, mlp: str, mlp_in, mlp_out, q, k, v, o, head_dim) -> None:
    if config.intermediate_sizes is None:
        return
    for i, layer in enumerate(layers):
        inter, nh, nkv = config.intermediate_sizes[i], config.layer_num_heads[i], config.layer_num_kv_heads[i]
        m = getattr(layer, mlp) if mlp else layer
        for n in mlp_in:
            old = getattr(m, n)
            setattr(m, n, _linear(old, old.in_features, inter))
        old = getattr(m, mlp_out)
        setattr(m, mlp_out, _linear(old, inter, old.out_features))
        if inter == 0 and mlp:  # Llama-like (no biases); OPT's fc2 keeps adding its bias through zero-width linears
            setattr(layer, mlp, _EmptyMLP(m))
        a = getattr(layer, attn)
        for n, heads in ((q, nh), (k, nkv), (v, nkv)):
            old = getattr(a, n)
            setattr(a, n, _linear(old, old.in_features, heads * head_dim))
        old = getattr(a, o)
        setattr(a, o, _linear(old, nh * head_dim, old.out_features))
        a.num_heads, a.num_key_value_heads, a.num_key_value_groups = nh, nkv, nh // nkv


class SurgeonPrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = SurgeonPrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        _shrink(self.model.layers, config, attn="self_attn", mlp="mlp", mlp_in=("gate_proj", "up_proj"),
                mlp_out="down_proj", q="q_proj", k="k_proj", v="v_proj", o="o_proj", head_dim=hd)


class SurgeonPrunedOPTForCausalLM(OPTForCausalLM):
    config_class = SurgeonPrunedOPTConfig

    def __init__(self, config):
        super().__init__(config)
        _shrink(self.model.decoder.layers, config, attn="self_attn", mlp="", mlp_in=("fc1",), mlp_out="fc2",
                q="q_proj", k="k_proj", v="v_proj", o="out_proj",
                head_dim=config.hidden_size // config.num_attention_heads)
