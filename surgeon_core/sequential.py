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
    # (args, kwargs) the decoder passed to each layer: layers of different types (Gemma's sliding and full attention)
    # get other masks and rotary tables; tensors shared between layers are stored once
    by_layer: list[tuple[tuple, dict[str, Any]]] | None = None

    def for_layer(self, i: int) -> None:
        """Switch ``args``/``kwargs`` to those of decoder layer ``i``."""
        if self.by_layer is not None:
            self.args, self.kwargs = self.by_layer[i]


def _to(obj: Any, device: torch.device, memo: dict | None = None) -> Any:
    """Move every tensor in a (possibly nested) tuple/list/dict to ``device``; other values pass through.
    ``memo`` ({id: moved tensor}) moves a tensor seen before only once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is kept alive so its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
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


class _ArgumentRecorder(nn.Module):
    """Stands in for a decoder layer while layer 0's inputs are captured: records its arguments, returns the hidden
    states unchanged."""

    def __init__(self, record: Callable[[tuple, dict], None]):
        super().__init__()
        self.record = record

    def forward(self, *args, **kwargs):
        self.record(args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    adapter: ArchitectureAdapter,
    batch_size: int,
    device: torch.device,
    offload_device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[LayerInputs]:
    """Inputs of decoder layer 0 for each calibration batch of ``windows`` (n, L), with the other arguments the
    decoder passes to every layer (``LayerInputs.by_layer``).

    The decoder's ModuleList is temporarily replaced by one holding layer 0 and, in the places of the others,
    modules without weights that record their arguments and pass the hidden states through, so the forward runs the
    embeddings, layer 0 and the final norm; the original list is restored in ``finally``. While the list is cut
    down, ``model.base_model.to(device)`` moves only the embeddings/norms/rotary tables and layer 0.
    """
    parent, attr, layers = _layer_list(model, adapter)
    base = model.base_model
    origin = _module_device(base)
    captured: list[LayerInputs] = []
    memo: dict = {}

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        memo.clear()
        other = (_to(tuple(args[1:]), offload_device, memo), _to(rest, offload_device, memo))
        captured.append(LayerInputs(hidden.to(offload_device), *other, by_layer=[other]))

    def record_other(args, kwargs):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured[-1].by_layer.append((_to(tuple(args[1:]), offload_device, memo), _to(rest, offload_device, memo)))

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList([layers[0]] + [_ArgumentRecorder(record_other) for _ in layers[1:]]))
    try:
        base.to(device)
        for s in range(0, windows.shape[0], batch_size):
            base(input_ids=windows[s : s + batch_size].to(device), use_cache=False)
            if progress is not None:
                progress(min(s + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        handle.remove()
        memo.clear()
        if origin is not None:
            base.to(origin)
        setattr(parent, attr, layers)
    return captured


class _Phase:
    """Cumulative progress of one phase over the whole pass: ``tick()`` after each of its ``total`` units."""

    def __init__(self, progress: Callable[[str, int, int], None] | None, name: str, total: int):
        self.progress, self.name, self.total, self.done = progress, name, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.name, self.done, self.total)


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
    phase: _Phase | None = None,
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
            if phase is not None:
                phase.tick()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _sequential_stages(groups: list[tuple[str, ...]], adapter: ArchitectureAdapter) -> list[list[tuple[str, ...]]]:
    """True-sequential stages of a layer: each input group on its own, in forward order."""
    order = {name: k for k, name in enumerate(adapter.linears)}
    return [[group] for group in sorted(groups, key=lambda g: min(order[n] for n in g))]


def _prune_groups_in_order(i, layer, linears, batches, groups, make_stats, prune_layer, device, adapter,
                           phase: _Phase | None = None) -> dict:
    """True-sequential pruning of one layer: each stage of input groups (:func:`_sequential_stages`) is calibrated on
    the outputs of the stages already pruned before it, then pruned; returns the merged report (``linears`` entries
    and the overall ``sparsity``)."""
    merged: dict = {}
    for stage in _sequential_stages(groups, adapter):
        stats = _calibrate(layer, linears, batches, stage, make_stats, device, phase)
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
def _prune_layer_and_propagate(i, layer, batches, groups, adapter, make_stats, prune_layer, device,
                               true_sequential, statistics, outputs):
    """Calibrate and prune decoder layer ``i`` (already on ``device``), then run the batches through it: its
    outputs are the next layer's inputs. Returns ``prune_layer``'s report."""
    linears = {name: get_submodule(layer, name) for name in adapter.linears}
    if true_sequential and make_stats is not None:
        report = _prune_groups_in_order(i, layer, linears, batches, groups, make_stats, prune_layer,
                                        device, adapter, statistics)
    else:
        stats = {} if make_stats is None else _calibrate(layer, linears, batches, groups, make_stats,
                                                         device, statistics)
        report = prune_layer(i, linears, stats)
        del stats  # a 7B down_proj Hessian is 0.5 GB: free it before the next layer's
    for batch in batches:
        batch.hidden = _run_layer(layer, batch, device).to(batch.hidden.device)
        outputs.tick()
    _sync(device)
    return report


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
    progress: Callable[[str, int, int], None] | None = None,
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
        progress: called as ``progress(phase, done, total)`` after every unit of work, each phase counted over the
            whole pass: ``"inputs"`` (calibration batches through the embeddings to layer 0), ``"statistics"``
            (batches through a layer with ``make_stats``' hooks, every layer and true-sequential stage),
            ``"outputs"`` (batches through a pruned layer) and ``"layers"`` (decoder layers done).
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
                                       device=device, offload_device=offload_device,
                                       progress=(lambda d, n: progress("inputs", d, n)) if progress else None)
        layers = get_submodule(model, adapter.layers)
        passes = len(_sequential_stages(groups, adapter)) if true_sequential else 1
        statistics = _Phase(progress, "statistics", len(layers) * len(batches) * passes)
        outputs = _Phase(progress, "outputs", len(layers) * len(batches))
        for i, layer in enumerate(layers):
            origin = _module_device(layer)
            start = time.perf_counter()
            layer.to(device)
            for batch in batches:
                batch.for_layer(i)
            try:
                report = _prune_layer_and_propagate(i, layer, batches, groups, adapter, make_stats, prune_layer,
                                                    device, true_sequential, statistics, outputs)
            finally:
                if origin is not None:
                    layer.to(origin)
            reports.append({"layer": i, **(report or {}), "seconds": time.perf_counter() - start})
            if progress is not None:
                progress("layers", i + 1, len(layers))
    finally:
        model.train(was_training)
    return reports
