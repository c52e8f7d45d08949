"""Materialization: drop FFN units and attention heads that are entirely zero, slicing the linears in place.

Removable (exact, the logits do not change):
- FFN unit j: column j of the consumer (down / fc2) is zero, or every producer row j (gate/up, fc1 + bias; rows j
  and I + j of a fused gate_up) is zero (the activations used here all map 0 to 0);
- query head h: its o columns are zero (q rows alone are not enough: zero scores still average v);
- kv group g: all its query heads are removable (then k/v rows feed nothing).
GQA needs the same number of query heads per kept kv group, so each kept group keeps max-over-groups heads, padded
with removable (zero-output) heads. Every layer keeps at least one head. A layer whose FFN has no unit left keeps
zero-width linears (their weights have 0 rows/columns); where the adapter names the FFN module (``mlp_block``:
Llama-like, no biases) that module becomes an :class:`EmptyMLP`, which returns zero without any work, so the
layer skips its FFN matmuls altogether instead of multiplying by zeros.

Alignment: matmuls whose width is not a multiple of 64 run much slower than aligned ones, so :func:`pad_kept`
rounds each layer's FFN width up to a multiple of ``align`` by keeping extra removable units. They
are all-zero units, so the function is unchanged; they cost their parameters (counted in every report).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .adapters import ArchitectureAdapter, get_submodule

__all__ = ["find_kept", "pad_kept", "slice_linear", "materialize_", "count_parameters", "EmptyMLP", "LayerConfig"]


def _zero_rows(lin: nn.Linear) -> torch.Tensor:
    z = lin.weight.abs().sum(dim=1) == 0
    return z & (lin.bias == 0) if lin.bias is not None else z


@torch.no_grad()
def find_kept(model: nn.Module, adapter: ArchitectureAdapter, layout: tuple[int, int, int]) -> list[dict]:
    """Per layer {"ffn": kept units, "heads": kept query heads (grouped by kv group), "kv": kept kv groups}."""
    n_heads, n_kv, hd = layout
    group = n_heads // n_kv
    out = []
    for layer in get_submodule(model, adapter.layers):
        down = get_submodule(layer, adapter.mlp_out)
        dead = down.weight.abs().sum(dim=0) == 0
        inter = down.in_features
        prod = torch.stack([_zero_rows(get_submodule(layer, n))[off: off + inter]
                            for n, off in adapter.mlp_rows(inter)]).all(dim=0)
        ffn = torch.nonzero(~(dead | prod)).flatten().cpu()
        o = get_submodule(layer, adapter.attention_out)
        head_alive = o.weight.abs().reshape(o.out_features, n_heads, hd).sum(dim=(0, 2)) > 0  # (n_heads,)
        per_group = head_alive.reshape(n_kv, group)
        kv = torch.nonzero(per_group.any(dim=1)).flatten().cpu()
        if kv.numel() == 0:
            kv = torch.tensor([0])
        m = max(1, int(per_group.sum(dim=1).max()))
        heads = []
        for g in kv.tolist():
            order = sorted(range(group), key=lambda x: (not bool(per_group[g, x]), x))[:m]
            heads += [g * group + x for x in sorted(order)]
        out.append({"ffn": ffn, "heads": torch.tensor(heads), "kv": kv})
    return out


def pad_kept(kept: list[dict], intermediate_size: int, align: int) -> list[dict]:
    """Round every layer's kept FFN units up to a multiple of ``align`` (at most ``intermediate_size``) by adding
    the lowest-index removed units; heads are untouched (their width is a multiple of head_dim already)."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    out = []
    for kp in kept:
        ffn = kp["ffn"].cpu()
        want = min(intermediate_size, -(-ffn.numel() // align) * align)
        if want > ffn.numel():
            free = torch.ones(intermediate_size, dtype=torch.bool)
            free[ffn] = False
            extra = torch.nonzero(free).flatten()[: want - ffn.numel()]
            ffn = torch.sort(torch.cat([ffn, extra])).values
        out.append({**kp, "ffn": ffn})
    return out


@torch.no_grad()
def slice_linear(lin: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with the given output rows (and their biases) and input columns."""
    W = lin.weight
    if rows is not None:
        W = W[rows]
    if cols is not None:
        W = W[:, cols]
    with warnings.catch_warnings():  # a zero-width layer: "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    new.weight.copy_(W)
    if lin.bias is not None:
        new.bias.copy_(lin.bias[rows] if rows is not None else lin.bias)
    return new


def _set(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(layer, parent) if parent else layer, name, module)


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


@torch.no_grad()
def materialize_(model: nn.Module, adapter: ArchitectureAdapter, layout: tuple[int, int, int],
                 kept: list[dict] | None = None, align: int = 1) -> list[dict]:
    """Slice every decoder layer to its kept units in place; returns per-layer sizes
    {"intermediate_size", "num_heads", "num_kv_heads"} (attention modules get per-layer head counts).
    ``align`` > 1 pads each FFN width to a multiple of it with all-zero units (:func:`pad_kept`)."""
    n_heads, n_kv, hd = layout
    kept = kept or find_kept(model, adapter, layout)
    if align > 1:
        width = get_submodule(get_submodule(model, adapter.layers)[0], adapter.mlp_out).in_features
        kept = pad_kept(kept, width, align)
    sizes = []
    for layer, kp in zip(get_submodule(model, adapter.layers), kept):
        inter = get_submodule(layer, adapter.mlp_out).in_features
        ffn_rows: dict[str, list[torch.Tensor]] = {}
        for n, off in adapter.mlp_rows(inter):
            ffn_rows.setdefault(n, []).append(kp["ffn"] + off)
        for n, parts in ffn_rows.items():
            _set(layer, n, slice_linear(get_submodule(layer, n), rows=torch.cat(parts)))
        _set(layer, adapter.mlp_out, slice_linear(get_submodule(layer, adapter.mlp_out), cols=kp["ffn"]))
        if kp["ffn"].numel() == 0 and adapter.mlp_block:
            _set(layer, adapter.mlp_block, EmptyMLP(get_submodule(layer, adapter.mlp_block)))
        qr, kvr = _head_rows(kp["heads"], hd), _head_rows(kp["kv"], hd)
        attn_rows: dict[str, list[torch.Tensor]] = {}
        for role, idx in (("q", qr), ("k", kvr), ("v", kvr)):
            n, off = adapter.attention_rows(layout)[role]
            attn_rows.setdefault(n, []).append(idx + off)
        for n, parts in attn_rows.items():
            _set(layer, n, slice_linear(get_submodule(layer, n), rows=torch.cat(parts)))
        _set(layer, adapter.attention_out, slice_linear(get_submodule(layer, adapter.attention_out), cols=qr))
        nh, nkv = int(kp["heads"].numel()), int(kp["kv"].numel())
        attn = get_submodule(layer, adapter.attention_out.rpartition(".")[0])
        set_head_counts(attn, nh, nkv)
        sizes.append({"intermediate_size": int(kp["ffn"].numel()), "num_heads": nh, "num_kv_heads": nkv})
    return sizes


class EmptyMLP(nn.Module):
    """An FFN with no unit left, whose output is exactly zero: returns a zero scalar (broadcast by the residual add)
    without touching its input. Keeps the original's (zero-width) children, so module paths and state-dict keys
    stay those of the family."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x.new_zeros(())


class LayerConfig:
    """A decoder layer's view of the model config with its own head counts (attention that reads them from its
    config, as Phi-3's fused qkv split does); every other attribute is the shared config's, read live."""

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


def set_head_counts(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Per-layer head counts on an attention module (the attribute names Llama-like and OPT attention read, and
    the head counts of its config where it keeps one)."""
    attn.num_heads = num_heads
    attn.num_key_value_heads = num_kv_heads
    attn.num_key_value_groups = num_heads // num_kv_heads
    config = getattr(attn, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        return
    base = object.__getattribute__(config, "_base") if isinstance(config, LayerConfig) else config
    if (num_heads, num_kv_heads) == (base.num_attention_heads, getattr(base, "num_key_value_heads", num_kv_heads)):
        attn.config = base
    else:
        attn.config = LayerConfig(base, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)


def count_parameters(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> dict[str, int]:
    """{"total": all parameters, "prunable": weights of the decoder linears, "nonzero_prunable": their nonzeros}."""
    from .adapters import prunable_linears

    lins = prunable_linears(model, adapter)
    return {"total": sum(p.numel() for p in model.parameters()),
            "prunable": sum(lin.weight.numel() for lin in lins.values()),
            "nonzero_prunable": sum(int(torch.count_nonzero(lin.weight)) for lin in lins.values())}
