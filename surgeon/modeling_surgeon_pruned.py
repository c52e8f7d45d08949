"""Modelling code for materialized (per-layer smaller) models written by ``surgeon materialize``: Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3 and OPT.

Stock transformers configs have one intermediate size and one head count for all layers. These subclasses build
the stock model, then shrink each decoder layer to ``intermediate_sizes[i]``, ``layer_num_heads[i]`` and
``layer_num_kv_heads[i]`` (head_dim unchanged), so the saved safetensors load with matching shapes. Everything
else (sliding windows, soft-capping, q/k norms, pre/post norms, tied embeddings) is the stock family's code.
Fused layers (Phi-3's ``qkv_proj`` [q; k; v] and ``gate_up_proj`` [gate; up]) shrink every segment.

Self-contained (imports only torch and transformers): ``surgeon materialize`` copies this file into the output
folder and points ``auto_map`` in config.json at it, so the folder loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` offline; importing
``surgeon.materialized_export`` registers the classes so ``trust_remote_code`` is not needed then.
"""

from __future__ import annotations

import warnings

from torch import nn
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM, GemmaConfig,
                          GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)


class _PerLayerSizes:
    def _init_sizes(self, intermediate_sizes, layer_num_heads, layer_num_kv_heads):
        self.intermediate_sizes = list(intermediate_sizes) if intermediate_sizes is not None else None
        self.layer_num_heads = list(layer_num_heads) if layer_num_heads is not None else None
        self.layer_num_kv_heads = list(layer_num_kv_heads) if layer_num_kv_heads is not None else None


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


class _LayerConfig:
    """A decoder layer's view of the config with its own head counts (Phi-3's attention splits its fused qkv by
    the config's head count); every other attribute is the shared config's, read live."""

    def __init__(self, base, **own):
        # own values are found by plain lookup, the rest through __getattr__ (no object.__getattribute__: torch.compile)
        self.__dict__.update(own, _base=base)

    def __getattr__(self, name):  # only for names not found on the instance: the shared config's, read live
        base = self.__dict__.get("_base")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_base"], name, value)


# family -> (decoder layers path, attention, (q, k, v) or (fused qkv,), o, mlp ("" = the layer), producers,
#            segments per producer, consumer, FFN may become _EmptyMLP)
_LAYOUTS = {
    "llama": ("model.layers", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", ("gate_proj", "up_proj"),
              1, "down_proj", True),
    "gemma": ("model.layers", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", ("gate_proj", "up_proj"),
              1, "down_proj", False),  # the post-FFN norm needs a full-shaped zero
    "phi3": ("model.layers", "self_attn", ("qkv_proj",), "o_proj", "mlp", ("gate_up_proj",), 2, "down_proj", True),
    "opt": ("model.decoder.layers", "self_attn", ("q_proj", "k_proj", "v_proj"), "out_proj", "", ("fc1",), 1, "fc2",
            False),  # fc2 keeps adding its bias through zero-width linears
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _shrink(model, config, layout: str) -> None:
    if config.intermediate_sizes is None:
        return
    layers, attn, qkv, o, mlp, producers, halves, consumer, empty = _LAYOUTS[layout]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i, layer in enumerate(_get(model, layers)):
        inter, nh, nkv = config.intermediate_sizes[i], config.layer_num_heads[i], config.layer_num_kv_heads[i]
        m = getattr(layer, mlp) if mlp else layer
        for n in producers:
            old = getattr(m, n)
            setattr(m, n, _linear(old, old.in_features, halves * inter))
        old = getattr(m, consumer)
        setattr(m, consumer, _linear(old, inter, old.out_features))
        if inter == 0 and mlp and empty:
            setattr(layer, mlp, _EmptyMLP(m))
        a = getattr(layer, attn)
        widths = ((nh + 2 * nkv,),) if len(qkv) == 1 else ((nh,), (nkv,), (nkv,))
        for n, (heads,) in zip(qkv, widths):
            old = getattr(a, n)
            setattr(a, n, _linear(old, old.in_features, heads * head_dim))
        old = getattr(a, o)
        setattr(a, o, _linear(old, nh * head_dim, old.out_features))
        a.num_heads, a.num_key_value_heads, a.num_key_value_groups = nh, nkv, nh // nkv
        if getattr(a, "config", None) is not None and hasattr(a.config, "num_attention_heads") and \
                (nh, nkv) != (config.num_attention_heads, getattr(config, "num_key_value_heads", nkv)):
            a.config = _LayerConfig(config, num_attention_heads=nh, num_key_value_heads=nkv)


def _family(name: str, config_cls, model_cls, layout: str, model_type: str):
    """The per-layer-size (config, model) subclasses of one stock family."""

    def config_init(self, intermediate_sizes=None, layer_num_heads=None, layer_num_kv_heads=None, **kwargs):
        self._init_sizes(intermediate_sizes, layer_num_heads, layer_num_kv_heads)
        config_cls.__init__(self, **kwargs)

    cfg = type(f"SurgeonPruned{name}Config", (config_cls, _PerLayerSizes),
               {"model_type": model_type, "__init__": config_init, "__module__": __name__})

    def model_init(self, config):
        model_cls.__init__(self, config)
        _shrink(self, config, layout)

    mdl = type(f"SurgeonPruned{name}ForCausalLM", (model_cls,),
               {"config_class": cfg, "__init__": model_init, "__module__": __name__})
    return cfg, mdl


SurgeonPrunedLlamaConfig, SurgeonPrunedLlamaForCausalLM = _family(
    "Llama", LlamaConfig, LlamaForCausalLM, "llama", "surgeon_pruned_llama")
SurgeonPrunedMistralConfig, SurgeonPrunedMistralForCausalLM = _family(
    "Mistral", MistralConfig, MistralForCausalLM, "llama", "surgeon_pruned_mistral")
SurgeonPrunedQwen2Config, SurgeonPrunedQwen2ForCausalLM = _family(
    "Qwen2", Qwen2Config, Qwen2ForCausalLM, "llama", "surgeon_pruned_qwen2")
SurgeonPrunedQwen3Config, SurgeonPrunedQwen3ForCausalLM = _family(
    "Qwen3", Qwen3Config, Qwen3ForCausalLM, "llama", "surgeon_pruned_qwen3")
SurgeonPrunedGemmaConfig, SurgeonPrunedGemmaForCausalLM = _family(
    "Gemma", GemmaConfig, GemmaForCausalLM, "gemma", "surgeon_pruned_gemma")
SurgeonPrunedGemma2Config, SurgeonPrunedGemma2ForCausalLM = _family(
    "Gemma2", Gemma2Config, Gemma2ForCausalLM, "gemma", "surgeon_pruned_gemma2")
SurgeonPrunedGemma3TextConfig, SurgeonPrunedGemma3TextForCausalLM = _family(
    "Gemma3Text", Gemma3TextConfig, Gemma3ForCausalLM, "gemma", "surgeon_pruned_gemma3_text")
SurgeonPrunedPhi3Config, SurgeonPrunedPhi3ForCausalLM = _family(
    "Phi3", Phi3Config, Phi3ForCausalLM, "phi3", "surgeon_pruned_phi3")
SurgeonPrunedOPTConfig, SurgeonPrunedOPTForCausalLM = _family(
    "OPT", OPTConfig, OPTForCausalLM, "opt", "surgeon_pruned_opt")

# source model_type -> (config class, model class); the exporter's table
FAMILIES = {
    "llama": (SurgeonPrunedLlamaConfig, SurgeonPrunedLlamaForCausalLM),
    "mistral": (SurgeonPrunedMistralConfig, SurgeonPrunedMistralForCausalLM),
    "qwen2": (SurgeonPrunedQwen2Config, SurgeonPrunedQwen2ForCausalLM),
    "qwen3": (SurgeonPrunedQwen3Config, SurgeonPrunedQwen3ForCausalLM),
    "gemma": (SurgeonPrunedGemmaConfig, SurgeonPrunedGemmaForCausalLM),
    "gemma2": (SurgeonPrunedGemma2Config, SurgeonPrunedGemma2ForCausalLM),
    "gemma3_text": (SurgeonPrunedGemma3TextConfig, SurgeonPrunedGemma3TextForCausalLM),
    "phi3": (SurgeonPrunedPhi3Config, SurgeonPrunedPhi3ForCausalLM),
    "opt": (SurgeonPrunedOPTConfig, SurgeonPrunedOPTForCausalLM),
}
for _cfg, _model in list(FAMILIES.values()):  # materialized models of materialized models keep their family
    FAMILIES.setdefault(_cfg.model_type, (_cfg, _model))
