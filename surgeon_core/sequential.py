"""Layer-by-layer calibration driver, as in the SparseGPT and Wanda papers.

The inputs of decoder layer i are the outputs of the already-pruned layers < i. The inputs of layer 0 are captured
with a forward pre-hook while the decoder runs with its layer list cut down to layer 0 (no exception-as-control-flow
"Catcher"). Each layer is then moved to ``device``, calibrated (forward hooks stream input statistics of its
prunable linears), handed to a pruning callback, and re-run to produce the next layer's inputs. Captured hidden
states stay on ``offload_device``. Architecture differences come only from the adapter table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .adapters import ArchitectureAdapter, adapter_for, get_submodule

__all__ = ["InputStatistic", "LayerInputs", "capture_layer_inputs", "run_layerwise"]


class InputStatistic(Protocol):
    """Anything that streams statistics of a linear's input activations."""

    def update(self, x: torch.Tensor) -> None: ...


@dataclass
class LayerInputs:
    """One calibration batch at the input of the current decoder layer.

    ``hidden`` (B, T, D) lives on the offload device; ``args``/``kwargs`` are the other arguments the decoder
    passed to layer 0 (attention mask, position ids, rotary ``position_embeddings`` in transformers 5, ...).
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def _to(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (possibly nested) tuple/list/dict to ``device``; other values pass through."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _module_device(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return p.device if p is not None else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_list(model: nn.Module, adapter: ArchitectureAdapter) -> tuple[nn.Module, str, nn.ModuleList]:
    parent_path, _, attr = adapter.layers.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    return parent, attr, getattr(parent, attr)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    adapter: ArchitectureAdapter,
    batch_size: int,
    device: torch.device,
    offload_device: torch.device,
) -> list[LayerInputs]:
    """Inputs of decoder layer 0 for each calibration batch of ``windows`` (n, L).

    The decoder's ModuleList is temporarily replaced by one holding only layer 0, so the forward runs the
    embeddings, layer 0 and the final norm; the original list is restored in ``finally``. While the list is cut
    down, ``model.base_model.to(device)`` moves only the embeddings/norms/rotary tables and layer 0.
    """
    parent, attr, layers = _layer_list(model, adapter)
    base = model.base_model
    origin = _module_device(base)
    captured: list[LayerInputs] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append(LayerInputs(hidden.to(offload_device), _to(tuple(args[1:]), offload_device),
                                    _to(rest, offload_device)))

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList([layers[0]]))
    try:
        base.to(device)
        for s in range(0, windows.shape[0], batch_size):
            base(input_ids=windows[s : s + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
        if origin is not None:
            base.to(origin)
        setattr(parent, attr, layers)
    return captured


def _run_layer(layer: nn.Module, batch: LayerInputs, device: torch.device) -> torch.Tensor:
    out = layer(batch.hidden.to(device), *_to(batch.args, device), **_to(batch.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out  # transformers 5 returns a tensor, 4.x a tuple


def _input_groups(adapter: ArchitectureAdapter) -> list[tuple[str, ...]]:
    """Linears that read the same tensor share one statistic (q/k/v, gate/up): one Hessian instead of three."""
    groups = [tuple(g) for g in adapter.input_groups]
    grouped = {name for g in groups for name in g}
    return groups + [(name,) for name in adapter.linears if name not in grouped]


def _calibrate(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    batches: Sequence[LayerInputs],
    groups: list[tuple[str, ...]],
    make_stats: Callable[[nn.Linear], InputStatistic],
    device: torch.device,
) -> dict[str, InputStatistic]:
    stats: dict[str, InputStatistic] = {}
    handles = []
    try:
        for group in groups:
            first = linears[group[0]]
            if any(linears[name].in_features != first.in_features for name in group):
                raise ValueError(f"input group {group} mixes input widths; fix the adapter's input_groups")
            stat = make_stats(first)
            stats.update({name: stat for name in group})
            handles.append(first.register_forward_hook(lambda _m, args, _out, stat=stat: stat.update(args[0])))
        for batch in batches:
            _run_layer(layer, batch, device)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _sequential_stages(groups: list[tuple[str, ...]], adapter: ArchitectureAdapter) -> list[list[tuple[str, ...]]]:
    """True-sequential stages of a layer: each input group on its own, in forward order."""
    order = {name: k for k, name in enumerate(adapter.linears)}
    return [[group] for group in sorted(groups, key=lambda g: min(order[n] for n in g))]


def _prune_groups_in_order(i, layer, linears, batches, groups, make_stats, prune_layer, device, adapter) -> dict:
    """True-sequential pruning of one layer: each stage of input groups (:func:`_sequential_stages`) is calibrated on
    the outputs of the stages already pruned before it, then pruned; returns the merged report (``linears`` entries
    and the overall ``sparsity``)."""
    merged: dict = {}
    for stage in _sequential_stages(groups, adapter):
        stats = _calibrate(layer, linears, batches, stage, make_stats, device)
        rep = prune_layer(i, {name: linears[name] for group in stage for name in group}, stats) or {}
        del stats
        for key, value in rep.items():
            if key == "linears":
                merged.setdefault("linears", {}).update(value)
            elif key != "sparsity":
                merged[key] = value
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    merged["sparsity"] = zeros / sum(lin.weight.numel() for lin in linears.values())
    return merged


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    prune_layer: Callable[[int, dict[str, nn.Linear], dict[str, InputStatistic]], dict],
    make_stats: Callable[[nn.Linear], InputStatistic] | None = None,
    adapter: ArchitectureAdapter | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    offload_device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    true_sequential: bool = False,
) -> list[dict]:
    """Sequential layer-wise calibration and pruning of every decoder layer.

    Args:
        model: a causal LM covered by the adapter table (it is modified only by ``prune_layer``).
        windows: (n, L) token ids for calibration.
        prune_layer: ``prune_layer(i, linears, stats) -> report``. ``linears`` maps the adapter's names inside the
            layer (e.g. ``"self_attn.q_proj"``) to modules already on ``device``; ``stats`` maps the same names to
            the statistics from ``make_stats`` (linears of one input group share the same object). The callback
            assigns the new weights itself.
        make_stats: ``make_stats(linear) -> statistic`` with ``update(x)``; None skips the calibration pass.
        batch_size: calibration windows per forward.
        device: where each layer runs (default: the model's device). Layers are moved there one at a time and
            moved back afterwards.
        offload_device: where captured hidden states are kept between layers (default: ``device``).
        progress: called as ``progress(layers_done, num_layers)``.
        true_sequential: calibrate and prune the input groups of a layer one after another in forward order
            (q/k/v, then o on the outputs of the pruned q/k/v, then gate/up, then down), as GPTQ/SparseGPT's
            ``--true-sequential``; default: every linear of the layer is calibrated on the dense layer's inputs
            (one pass, as the SparseGPT and Wanda scripts do by default). ``prune_layer`` is then called once per
            group with that group's linears, and the layer's report merges the groups' ``linears`` entries.

    Returns:
        one dict per decoder layer: the callback's report plus ``layer`` (index) and ``seconds`` (wall clock of
        calibration + pruning + propagation).
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty (n, L) tensor of token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = adapter or adapter_for(model)
    device = torch.device(device) if device is not None else _module_device(model)
    offload_device = torch.device(offload_device) if offload_device is not None else device
    groups = _input_groups(adapter)
    was_training = model.training
    model.eval()  # OPT applies dropout when training
    reports = []
    try:
        batches = capture_layer_inputs(model, windows.long(), adapter=adapter, batch_size=batch_size,
                                       device=device, offload_device=offload_device)
        layers = get_submodule(model, adapter.layers)
        for i, layer in enumerate(layers):
            origin = _module_device(layer)
            start = time.perf_counter()
            layer.to(device)
            try:
                linears = {name: get_submodule(layer, name) for name in adapter.linears}
                if true_sequential and make_stats is not None:
                    report = _prune_groups_in_order(i, layer, linears, batches, groups, make_stats, prune_layer,
                                                    device, adapter)
                else:
                    stats = {} if make_stats is None else _calibrate(layer, linears, batches, groups, make_stats,
                                                                     device)
                    report = prune_layer(i, linears, stats)
                    del stats  # a 7B down_proj Hessian is 0.5 GB: free it before the next layer's
                for batch in batches:  # outputs of the pruned layer are the next layer's inputs
                    batch.hidden = _run_layer(layer, batch, device).to(batch.hidden.device)
                _sync(device)
            finally:
                if origin is not None:
                    layer.to(origin)
            reports.append({"layer": i, **(report or {}), "seconds": time.perf_counter() - start})
            if progress is not None:
                progress(i + 1, len(layers))
    finally:
        model.train(was_training)
    return reports
