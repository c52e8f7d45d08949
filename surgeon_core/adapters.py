"""Architecture adapters: one table that says where things are in each model family.

The table is keyed by the Hugging Face ``config.model_type`` string (a registry key, not class-name sniffing).
Each entry names, relative to the model object:

- ``layers``: the decoder layers (a ``ModuleList``),
- ``linears``: the prunable linears inside one decoder layer, in forward order,
- ``input_groups``: linears that read the same input tensor (so they share one input factor A),
- ``couplings``: producer linears -> consumer linear (q/k/v -> o, gate/up -> down, fc1 -> fc2),
- ``head_config``: config attribute names for attention heads / key-value heads / head dim (GQA groups).

Fused layers (Phi-3): ``attention_in`` may name one linear holding the q, k and v rows stacked in that order
(``qkv_proj``), and ``mlp_halves=2`` says each ``mlp_in`` linear stacks the gate rows on the up rows
(``gate_up_proj``). Such a layer is one linear for K-FAC (one G over all its rows); the coupled units and
materialization address its segments through :meth:`ArchitectureAdapter.attention_rows` and
:meth:`ArchitectureAdapter.mlp_rows`.

A model type without an entry gets an adapter derived from its module names (:func:`derive_adapter`) when its
decoder layers have the Llama-like layout, checked on a forward pass before it is used. Mixture-of-experts models
are refused (:func:`refuse_moe`).

Only this module knows attribute paths; every other module asks it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ArchitectureAdapter",
    "UnsupportedArchitectureError",
    "ADAPTERS",
    "adapter_for",
    "derive_adapter",
    "moe_reason",
    "table_model_types",
    "refuse_moe",
    "prunable_linears",
    "get_submodule",
]


class UnsupportedArchitectureError(ValueError):
    """Raised when a model cannot be handled by any adapter (the message names what is missing; ``reason``: that
    part alone)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


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
    attention_in: tuple[str, ...] = field(default=())  # q, k, v; or one fused linear with q, k, v rows stacked
    attention_out: str = ""
    mlp_in: tuple[str, ...] = field(default=())
    mlp_out: str = ""
    # FFN module replaced by an EmptyMLP once it has no unit left (no biases, output added to the residual as is);
    # "": keep zero-width linears (OPT's fc2 bias; Gemma's post-FFN norm needs a full-shaped zero)
    mlp_block: str = ""
    mlp_halves: int = 1  # row segments of width intermediate_size stacked in each mlp_in linear (gate_up_proj: 2)
    derived: bool = False  # built by derive_adapter from module names, not written in the table

    def layer_type(self, linear_name: str) -> str:
        """'q_proj' for 'model.layers.3.self_attn.q_proj'."""
        return linear_name.rsplit(".", 1)[-1]

    def head_layout(self, config) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) from a model config object (head_dim as the config states it: Gemma's
        is independent of hidden_size / num_heads)."""
        n_heads = int(getattr(config, self.attention_heads))
        n_kv = int(getattr(config, self.kv_heads, None) or n_heads) if self.kv_heads else n_heads
        head_dim = getattr(config, "head_dim", None) or int(getattr(config, self.hidden_size)) // n_heads
        return n_heads, n_kv, int(head_dim)

    @property
    def fused_attention(self) -> bool:
        return len(self.attention_in) == 1

    def attention_rows(self, layout: tuple[int, int, int]) -> dict[str, tuple[str, int]]:
        """{"q"|"k"|"v": (linear name, row offset of the segment)}: separate linears, or a fused one [q; k; v]."""
        n_heads, n_kv, hd = layout
        if self.fused_attention:
            (qkv,) = self.attention_in
            return {"q": (qkv, 0), "k": (qkv, n_heads * hd), "v": (qkv, (n_heads + n_kv) * hd)}
        q, k, v = self.attention_in
        return {"q": (q, 0), "k": (k, 0), "v": (v, 0)}

    def mlp_rows(self, intermediate_size: int) -> list[tuple[str, int]]:
        """(linear name, row offset) of every FFN producer segment: unit j is row offset + j of each."""
        return [(n, s * intermediate_size) for n in self.mlp_in for s in range(self.mlp_halves)]


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
                                                     "surgeon_pruned_llama", "surgeon_pruned_mistral",
                                                     "surgeon_pruned_qwen2", "surgeon_pruned_qwen3"), **_LLAMA_LIKE),
    # pre- and post-norms around each block: an empty FFN must still return a full-shaped zero for its post-norm
    ArchitectureAdapter(family="gemma", model_types=("gemma", "gemma2", "gemma3_text", "surgeon_pruned_gemma",
                                                     "surgeon_pruned_gemma2", "surgeon_pruned_gemma3_text"),
                        **{**_LLAMA_LIKE, "mlp_block": ""}),
    ArchitectureAdapter(
        family="phi3",
        model_types=("phi3", "surgeon_pruned_phi3"),
        layers="model.layers",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        input_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        couplings=((("self_attn.qkv_proj",), "self_attn.o_proj"), (("mlp.gate_up_proj",), "mlp.down_proj")),
        attention_in=("self_attn.qkv_proj",),
        attention_out="self_attn.o_proj",
        mlp_in=("mlp.gate_up_proj",),
        mlp_out="mlp.down_proj",
        mlp_block="mlp",
        mlp_halves=2,
    ),
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
_DERIVED: "weakref.WeakKeyDictionary[nn.Module, ArchitectureAdapter]" = weakref.WeakKeyDictionary()

# config attributes that count routed experts, and model types that are mixtures of experts by construction
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "olmoe",
              "granitemoe", "phimoe", "jetmoe", "gpt_oss", "minimax", "llama4", "llama4_text", "switch_transformers")


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """Return the submodule at a dotted path, or None if any part is missing."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def moe_reason(config) -> str | None:
    """Why ``config`` describes a mixture-of-experts model (the attribute or type that says so), else None."""
    if config is None:
        return None
    model_type = getattr(config, "model_type", None)
    for attr in _EXPERT_COUNTS:
        n = getattr(config, attr, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            return f"{attr}={n}"
    if model_type in _MOE_TYPES:
        return f"model type '{model_type}'"
    return None


def refuse_moe(config) -> None:
    """Raise :class:`UnsupportedArchitectureError` for a mixture-of-experts config (experts are not pruned)."""
    reason = moe_reason(config)
    if reason is not None:
        raise UnsupportedArchitectureError(
            f"mixture-of-experts model ('{getattr(config, 'model_type', None)}', {reason}) is not supported: "
            "its experts are routed per token, and pruning them as dense FFNs would misread their curvature"
        )


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """Find and validate the adapter for ``model`` (checks that every named module exists). A model type without
    a table entry gets a derived adapter (:func:`derive_adapter`, verified on a forward pass once per model)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; supported model types: {table_model_types()}"
        )
    refuse_moe(config)
    adapter = _BY_TYPE.get(model_type)
    if adapter is None:
        adapter = _DERIVED.get(model)
        if adapter is None:
            adapter = derive_adapter(model)
            _DERIVED[model] = adapter
        return adapter
    _check_modules(model, adapter, model_type)
    return adapter


def _check_modules(model: nn.Module, adapter: ArchitectureAdapter, model_type: str) -> nn.ModuleList:
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
    return layers


# --------------------------------------------------------------------------------------------------- derivation

_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.layers", "layers")
_ATTENTION_BLOCKS = ("self_attn", "attention", "attn")
_QKV = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
_ATTENTION_OUT = ("o_proj", "out_proj", "dense")
_MLP_BLOCKS = ("mlp", "feed_forward", "ffn", "")
_MLP = ((("gate_proj", "up_proj"), "down_proj", 1), (("gate_up_proj",), "down_proj", 2), (("fc1",), "fc2", 1))


def _fail(head: str, reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(head + reason, reason)


def table_model_types() -> list[str]:
    """The model types with a hand-written adapter (the per-layer-size materialized types left out)."""
    return sorted(t for t in _BY_TYPE if not t.startswith("surgeon_pruned_"))


def _first_linears(block: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(block, n, None), nn.Linear) for n in names)


def derive_adapter(model: nn.Module, *, verify: bool = True) -> ArchitectureAdapter:
    """An adapter from the module names of an unlisted Llama-like decoder: decoder layers at one of
    ``model.layers`` / ``model.decoder.layers`` / ..., attention q/k/v/o (or fused qkv_proj [q; k; v]) and an MLP
    gate/up/down (or fused gate_up_proj, or fc1/fc2), all ``nn.Linear``. Checked on a forward pass of four tokens
    (:func:`verify_adapter`) before it is returned; anything missing raises one error naming it. ``verify=False``
    reads the names only (a model on the meta device, before its weights are loaded)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    head = (f"unsupported architecture '{model_type}': no adapter in the table (supported: "
            f"{', '.join(table_model_types())}) and none derived from its module names: ")
    refuse_moe(config)
    layers_path = next((p for p in _LAYER_PATHS if isinstance(get_submodule(model, p), nn.ModuleList)
                        and len(get_submodule(model, p))), None)
    if layers_path is None:
        raise _fail(head, f"no decoder layers (a ModuleList at {' / '.join(_LAYER_PATHS)})")
    layer = get_submodule(model, layers_path)[0]
    attn = next((b for b in _ATTENTION_BLOCKS if isinstance(getattr(layer, b, None), nn.Module)), None)
    if attn is None:
        raise _fail(head, f"no attention block ({' / '.join(_ATTENTION_BLOCKS)}) in "
                                           f"{type(layer).__name__}")
    block = getattr(layer, attn)
    qkv = next((names for names in _QKV if _first_linears(block, names)), None)
    out = next((n for n in _ATTENTION_OUT if _first_linears(block, (n,))), None)
    if qkv is None or out is None:
        missing = "q_proj/k_proj/v_proj or qkv_proj" if qkv is None else "o_proj / out_proj / dense"
        raise _fail(head, f"attention '{attn}' ({type(block).__name__}) has no linear "
                                           f"{missing}")
    mlp = None
    for mb in _MLP_BLOCKS:
        m = getattr(layer, mb, None) if mb else layer
        if not isinstance(m, nn.Module):
            continue
        for ins, cons, halves in _MLP:
            if _first_linears(m, ins + (cons,)):
                mlp = (mb, ins, cons, halves)
                break
        if mlp:
            break
    if mlp is None:
        raise _fail(head, "no MLP with linears gate_proj/up_proj/down_proj, gate_up_proj/"
                                           f"down_proj or fc1/fc2 (in {' / '.join(b for b in _MLP_BLOCKS if b)} or "
                                           "the layer itself)")
    mb, ins, cons, halves = mlp
    pre = f"{mb}." if mb else ""
    attention_in = tuple(f"{attn}.{n}" for n in qkv)
    attention_out = f"{attn}.{out}"
    mlp_in = tuple(pre + n for n in ins)
    mlp_out = pre + cons
    kv_attr = "num_key_value_heads" if getattr(config, "num_key_value_heads", None) else None
    adapter = ArchitectureAdapter(
        family=f"derived:{model_type}", model_types=(model_type,), layers=layers_path,
        linears=attention_in + (attention_out,) + mlp_in + (mlp_out,),
        input_groups=(attention_in, (attention_out,), mlp_in, (mlp_out,)),
        couplings=((attention_in, attention_out), (mlp_in, mlp_out)),
        kv_heads=kv_attr, attention_in=attention_in, attention_out=attention_out, mlp_in=mlp_in, mlp_out=mlp_out,
        mlp_halves=halves, derived=True)
    if verify:
        verify_adapter(model, adapter)
    return adapter


@torch.no_grad()
def verify_adapter(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """Check a derived adapter against the model: the linears' shapes match the config's head layout, and on a
    forward pass of four tokens every listed linear of every layer runs once and the members of each input group
    read one tensor (they share one input factor)."""
    model_type = getattr(model.config, "model_type", None)
    head = f"derived adapter for '{model_type}' does not match the model: "
    try:
        n_heads, n_kv, hd = adapter.head_layout(model.config)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise _fail(head, f"no head layout in its config ({exc})") from None
    layers = _check_modules(model, adapter, model_type)
    layer = layers[0]
    lin = {n: get_submodule(layer, n) for n in adapter.linears}
    inter = lin[adapter.mlp_out].in_features
    want = {adapter.attention_out: ("in_features", n_heads * hd)}
    if adapter.fused_attention:
        want[adapter.attention_in[0]] = ("out_features", (n_heads + 2 * n_kv) * hd)
    else:
        q, k, v = adapter.attention_in
        want.update({q: ("out_features", n_heads * hd), k: ("out_features", n_kv * hd),
                     v: ("out_features", n_kv * hd)})
    want.update({n: ("out_features", adapter.mlp_halves * inter) for n in adapter.mlp_in})
    for name, (attr, size) in want.items():
        if getattr(lin[name], attr) != size:
            raise UnsupportedArchitectureError(
                head + f"'{name}' has {attr}={getattr(lin[name], attr)}, expected {size} from heads={n_heads}, "
                f"kv heads={n_kv}, head_dim={hd}, intermediate={inter}")
    if n_heads % n_kv:
        raise _fail(head, f"{n_heads} heads do not split into {n_kv} key/value groups")
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, lay in enumerate(layers):
        for name in adapter.linears:
            handles.append(get_submodule(lay, name).register_forward_hook(
                lambda _m, args, _out, key=(i, name): seen.setdefault(key, []).append(args[0])))
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.zeros((1, 4), dtype=torch.long, device=device), use_cache=False)
    except Exception as exc:  # noqa: BLE001 - any failure of the check forward is reported as the reason
        raise _fail(head, f"its check forward failed: {type(exc).__name__}: {exc}") from None
    finally:
        for h in handles:
            h.remove()
    for i in range(len(layers)):
        for name in adapter.linears:
            if len(seen.get((i, name), [])) != 1:
                raise UnsupportedArchitectureError(
                    head + f"'{adapter.layers}.{i}.{name}' ran {len(seen.get((i, name), []))} times in one forward "
                    "(expected once)")
        for group in adapter.input_groups:
            first = seen[(i, group[0])][0]
            if any(seen[(i, n)][0] is not first and not torch.equal(seen[(i, n)][0], first) for n in group[1:]):
                raise _fail(head, f"{', '.join(group)} of layer {i} read different inputs")


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
