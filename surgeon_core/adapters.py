"""Architecture adapters: one table that says where things are in each model family.

The table is keyed by the Hugging Face ``config.model_type`` string (a registry key, not class-name sniffing).
Each entry names, relative to the model object:

- ``layers``: the decoder layers (a ``ModuleList``),
- ``linears``: the prunable linears inside one decoder layer, in forward order,
- ``input_groups``: linears that read the same input tensor (so they share one input factor A),
- ``couplings``: producer linears -> consumer linear (q/k/v -> o, gate/up -> down, fc1 -> fc2),
- ``head_config``: config attribute names for attention heads / key-value heads / head dim (GQA groups).

Only this module knows attribute paths; every other module asks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ArchitectureAdapter",
    "UnsupportedArchitectureError",
    "ADAPTERS",
    "adapter_for",
    "prunable_linears",
    "get_submodule",
]


class UnsupportedArchitectureError(ValueError):
    """Raised when a model cannot be handled by any adapter (the message names what is missing)."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    family: str
    model_types: tuple[str, ...]
    layers: str
    linears: tuple[str, ...]
    input_groups: tuple[tuple[str, ...], ...]
    couplings: tuple[tuple[tuple[str, ...], str], ...]
    attention_heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    hidden_size: str = "hidden_size"
    attention_in: tuple[str, ...] = field(default=())  # q, k, v
    attention_out: str = ""
    mlp_in: tuple[str, ...] = field(default=())
    mlp_out: str = ""
    # FFN module replaced by an EmptyMLP once it has no unit left (no biases); "": keep zero-width linears (OPT)
    mlp_block: str = ""

    def layer_type(self, linear_name: str) -> str:
        """'q_proj' for 'model.layers.3.self_attn.q_proj'."""
        return linear_name.rsplit(".", 1)[-1]

    def head_layout(self, config) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) from a model config object."""
        n_heads = int(getattr(config, self.attention_heads))
        n_kv = int(getattr(config, self.kv_heads, None) or n_heads) if self.kv_heads else n_heads
        head_dim = getattr(config, "head_dim", None) or int(getattr(config, self.hidden_size)) // n_heads
        return n_heads, n_kv, int(head_dim)


_LLAMA_LIKE = dict(
    layers="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    couplings=(
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),
        (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    ),
    attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    mlp_block="mlp",
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3",
                                                     "surgeon_pruned_llama"), **_LLAMA_LIKE),
    ArchitectureAdapter(
        family="opt",
        model_types=("opt", "surgeon_pruned_opt"),
        layers="model.decoder.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        input_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        couplings=(
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj"),
            (("fc1",), "fc2"),
        ),
        kv_heads=None,
        attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_out="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
    ),
)

_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """Return the submodule at a dotted path, or None if any part is missing."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """Find and validate the adapter for ``model`` (checks that every named module exists)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; supported model types: {sorted(_BY_TYPE)}"
        )
    adapter = _BY_TYPE.get(model_type)
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': no adapter (supported: {', '.join(sorted(_BY_TYPE))}); "
            "add an ArchitectureAdapter naming its decoder layers and prunable linears"
        )
    layers = get_submodule(model, adapter.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}': decoder layers not found at '{adapter.layers}'"
        )
    for name in adapter.linears:
        module = get_submodule(layers[0], name)
        if not isinstance(module, nn.Linear):
            raise UnsupportedArchitectureError(
                f"architecture '{model_type}': prunable linear '{name}' not found in decoder layer 0 "
                f"(got {type(module).__name__ if module is not None else 'nothing'})"
            )
    return adapter


def prunable_linears(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> dict[str, nn.Linear]:
    """Ordered {full name: nn.Linear} of every prunable linear (decoder blocks only; never embeddings/head).
    Zero-width linears (a materialized layer whose FFN lost every unit) hold nothing to prune and are left out."""
    adapter = adapter or adapter_for(model)
    layers = get_submodule(model, adapter.layers)
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layers):
        for name in adapter.linears:
            lin = get_submodule(layer, name)
            if lin.weight.numel():
                out[f"{adapter.layers}.{i}.{name}"] = lin
    return out
