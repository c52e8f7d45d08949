"""One pruning shot over a whole model (the paper's Algorithm 1, one iteration of its loop), and one step of a plan.

A shot, at the current weights: curvature (K-FAC factors, §3.1) → per-layer removal costs (§3.2) → one global
threshold (§3.3) → correlated OBS updates, or plain zeroing for the OBD/magnitude baselines (§3.4) → report. The
per-layer sub-problems are in ``subproblem.py``, where they are solved and wait in ``placement.py``; the same shot
written plainly, one layer at a time, is ``reference.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import coupled, distributed, placement
from .adapters import ArchitectureAdapter, adapter_for, get_submodule, prunable_linears
from .allocation import select_elements, select_groups, select_structures
from .baselines import prune_model_layerwise
from .curvature import KFACFactors, NonFiniteCurvatureError, RoundedCurvatureError, check_factors, estimate_kfac
from .methods import METHODS, MethodSpec, PruneOptions, Structure
from .placement import Placement
from .schedule import Step
from .subproblem import (LayerProblem, apply_elements_grouped, apply_structured, augmented, element_drop, factors_for,
                         prepare_layer, write_back)

__all__ = [
    "Structure",
    "NonFiniteCurvatureError",
    "RoundedCurvatureError",
    "check_factors",
    "MethodSpec",
    "METHODS",
    "PruneOptions",
    "ShotReport",
    "prune_shot",
    "run_step",
    "model_size",
]


@dataclass
class ShotReport:
    shot: int
    num_shots: int
    target_size: float
    achieved_size: float
    estimated_loss: float
    layer_sizes: dict[str, float]
    type_sizes: dict[str, float]
    seconds: dict[str, float]
    damping_escalations: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def model_size(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> tuple[float, dict, dict]:
    """(overall size, per-layer size, per-type size): fraction of nonzero prunable weights (biases excluded)."""
    adapter = adapter or adapter_for(model)
    per_layer, type_tot, type_nz = {}, {}, {}
    total = nonzero = 0
    for name, lin in prunable_linears(model, adapter).items():
        count = torch.count_nonzero(lin.weight)
        nz, n = int(count.full_tensor() if hasattr(count, "full_tensor") else count), lin.weight.numel()
        per_layer[name] = nz / n
        t = adapter.layer_type(name)
        type_tot[t] = type_tot.get(t, 0) + n
        type_nz[t] = type_nz.get(t, 0) + nz
        total += n
        nonzero += nz
    return nonzero / total, per_layer, {t: type_nz[t] / type_tot[t] for t in type_tot}


def prune_shot(
    model: nn.Module,
    windows: torch.Tensor | None,
    *,
    options: PruneOptions,
    target_size: float,
    shot: int = 1,
    num_shots: int = 1,
    adapter: ArchitectureAdapter | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    process_group=None,
) -> ShotReport:
    """Prune ``model`` in place down to ``target_size`` (fraction of prunable weights kept) in one shot.

    Data-parallel under torch.distributed (initialised, or ``process_group`` given; every rank passes the same
    model and all ``windows``): the curvature pass is shared out over the ranks and its sums all-reduced; the
    per-layer solves (damped inverses, costs) and updates are spread over the ranks by decoder layer, every rank
    applies the same global threshold to the shared costs, and each layer's owner broadcasts its new weights, so
    every rank returns with the same model and (rank 0's) report (surgeon_core.distributed). Coupled structures
    are solved on rank 0 alone.
    """
    adapter = adapter or adapter_for(model)
    dp = distributed.resolve(process_group)
    report = _prune_shot(model, windows, options=options, target_size=target_size, shot=shot, num_shots=num_shots,
                         adapter=adapter, progress=progress, dp=dp)
    if dp is None:
        return report
    if options.structure_spec.kind == "coupled":  # solved on rank 0 alone: its weights go to every rank
        t0 = time.perf_counter()
        linears = prunable_linears(model, adapter).values()
        distributed.broadcast_tensors([p.data for lin in linears for p in (lin.weight, lin.bias) if p is not None],
                                      dp)
        if dp.is_main:
            report.seconds["broadcast"] = time.perf_counter() - t0
    return distributed.broadcast_object(report, dp)


def _prune_shot(model, windows, *, options, target_size, shot, num_shots, adapter, progress, dp) -> ShotReport | None:
    """The shot on one rank (``dp`` None: the only one); ranks other than 0 stop after the curvature pass."""
    opts = options
    if opts.layerwise:
        raise ValueError(f"{opts.method} is a layer-wise baseline: call run_step() instead")
    device = torch.device(opts.device) if opts.device else next(model.parameters()).device
    linears = prunable_linears(model, adapter)
    sharded = placement.sharded_weights(linears)
    if sharded and opts.structure_spec.kind == "coupled":
        raise ValueError("coupled structures are solved by one rank: they need whole weights, not FSDP-sharded ones")
    seconds: dict[str, float] = {}
    factors = _curvature(model, windows, opts, adapter, device, shot, progress, dp, seconds)
    if opts.structure_spec.kind == "coupled":
        if dp is not None and not dp.is_main:
            return None  # rank 0 solves the coupled shot; prune_shot broadcasts its weights
        return _coupled_shot(model, factors, linears, adapter, opts, device, target_size, shot, num_shots, seconds,
                             progress)

    where = Placement.plan(linears, adapter, dp, opts, device, factors)
    kept = placement.gather_owned(linears, where.owners, where.rank) if sharded else None
    t0 = time.perf_counter()
    layers, escalations, extra_gain = _costs(linears, factors, opts, where, progress)
    del factors  # each factor was dropped after its last use: the last reference goes
    if dp is not None:
        escalations, extra_gain = _share_costs(layers, where, escalations, extra_gain, dp)
    seconds["costs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_remove = round((1.0 - target_size) * sum(lin.weight.numel() for lin in linears.values()))
    selections, estimated = _threshold(layers, n_remove, target_size, opts)
    seconds["allocation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if opts.structure_spec.kind == "structured":
        _update_structured(layers, selections, opts, where, progress)
    else:
        _update_elements(layers, selections, opts, where, progress)
    seconds["update"] = time.perf_counter() - t0
    if sharded:
        seconds["broadcast"] = placement.scatter_back(linears, where.owners, where.rank, kept, dp)
    elif dp is not None:
        seconds["broadcast"] = _broadcast_weights(layers, where, dp)
    extra = {"first_order_gain": extra_gain} if opts.first_order else {}  # the Newton steps' predicted change
    return _report(model, adapter, shot, num_shots, target_size, estimated, seconds, escalations, extra)


def _curvature(model, windows, opts, adapter, device, shot, progress, dp, seconds) -> KFACFactors | None:
    """§3.1: K-FAC factors A, G of every prunable linear at the current weights (None for magnitude)."""
    spec = opts.spec
    if spec.curvature == "none":
        return None
    if windows is None:
        raise ValueError(f"method {opts.method} needs calibration data")
    factors = estimate_kfac(
        model, windows, adapter=adapter, fisher=opts.fisher, fisher_samples=opts.fisher_samples,
        batch_size=opts.batch_size, device=device, factor_device=opts.factor_device or device,
        autocast_dtype=opts.autocast_dtype, gram_dtype=opts.gram_dtype, seed=opts.seed + shot,
        checkpoint_layers=opts.checkpoint_layers, passes=opts.factor_passes, storage=opts.factor_storage,
        owners=placement.owners(prunable_linears(model, adapter), adapter, dp) if opts.shard_factors and dp else None,
        collect_gradients=spec.curvature == "kfac", collect_weight_grads=opts.first_order,
        progress=(lambda i, n: progress("curvature", i, n)) if progress else None,
        process_group=dp.group if dp else None,
    )
    seconds["curvature"] = factors.seconds["curvature"]
    if "allreduce" in factors.seconds:
        seconds["allreduce"] = factors.seconds["allreduce"]
    rounded = opts.gram_dtype not in (None, torch.float32) and device.type != "cuda"
    damping = (opts.damping_a, opts.damping_g) if rounded else None
    if dp is None or not opts.shard_factors:
        check_factors(factors, opts.autocast_dtype, rounded_damping=damping)
        return factors
    try:  # each rank checks the factors it holds; all ranks raise together, so none waits for the others
        check_factors(factors, opts.autocast_dtype, rounded_damping=damping)
        error = None
    except NonFiniteCurvatureError as exc:
        error = exc
    kinds = torch.tensor([float(type(error) is NonFiniteCurvatureError), float(type(error) is RoundedCurvatureError)],
                         device=device)
    distributed.all_reduce_(kinds, dp)
    if error is None and kinds[1] > 0:
        error = RoundedCurvatureError("rounded bf16 factors of another rank are not positive definite")
    elif error is None and kinds[0] > 0:
        error = NonFiniteCurvatureError("calibration overflow: curvature factors of another rank hold NaN/Inf")
    if error is not None:
        raise error
    return factors


def _costs(linears, factors, opts, where: Placement, progress) -> tuple[list[LayerProblem], int, float]:
    """§3.2: each linear's sub-problem and removal costs (other ranks' linears: empty stubs). Every factor is
    dropped after its last use and the inverses are parked, so the factors and all inverses never coexist."""
    layers, escalations = [], 0
    inverse_cache, moved = {}, {}
    names = list(linears)
    group_of = factors.group_of if factors is not None else {}
    last_use = {group_of[n]: i for i, n in enumerate(names)} if factors is not None else {}
    for i, (name, lin) in enumerate(linears.items()):
        if where.owners[name] != where.rank:
            layers.append(placement.cost_stub(name, lin, opts, where.device))
            continue
        park_here = factors.G[name].device if where.park == "factor" else where.park
        layer, esc = prepare_layer(name, lin, factors, opts, where.device, inverse_cache)
        a_key = group_of.get(name, name)
        if factors is not None:
            factors.G.pop(name, None)
            if last_use.get(a_key) == i:
                factors.A.pop(a_key, None)
        if layer.W is not None and not opts.first_order:
            layer.W = None  # re-read from the model for the update: one weight copy fewer alive
        if park_here is not None:
            placement.move_layer(layer, park_here, moved)
        if i + 1 < len(names) and a_key != group_of.get(names[i + 1]):
            inverse_cache.clear()  # the next linear reads another input: drop this group's inverse
        escalations += esc
        layers.append(layer)
        if progress:
            progress("costs", i + 1, len(linears))
    return layers, escalations, sum(l.extra_gain for l in layers)


def _share_costs(layers, where: Placement, escalations: int, extra_gain: float, dp) -> tuple[int, float]:
    """Data-parallel: every rank gets every layer's costs, and the summed escalations and first-order gain."""
    placement.share_costs(layers, where.owners, dp)
    sums = distributed.all_reduce_(torch.tensor([float(escalations), extra_gain], dtype=torch.float64,
                                                device=where.device), dp)
    return int(sums[0].item()), float(sums[1].item())


def _threshold(layers: list[LayerProblem], n_remove: int, target_size: float, opts) -> tuple[list, float]:
    """§3.3: one global threshold over all layers' costs; returns the per-layer selections and their summed cost.

    Rows/columns: (row mask, column mask) per layer; elements: entry masks; N:M: group masks."""
    st = opts.structure_spec
    if st.kind == "structured":
        row_sel, col_sel = select_structures([l.row_cost for l in layers], [l.col_cost for l in layers], n_remove)
        estimated = 0.0
        for l, rs, cs in zip(layers, row_sel, col_sel):
            rs, cs = rs.to(l.row_cost.device), cs.to(l.col_cost.device)
            estimated += float(l.row_cost[rs & torch.isfinite(l.row_cost)].sum())
            estimated += float(l.col_cost[cs & torch.isfinite(l.col_cost)].sum())
        return list(zip(row_sel, col_sel)), estimated
    costs = [l.costs for l in layers]
    if st.kind == "nm":  # the fraction of all groups whose removal leaves target_size of the weights
        frac = (1.0 - target_size) / (1.0 - st.n / st.m)
        if frac > 1.0 + 1e-9:
            raise ValueError(f"{st} sparsity keeps at least {st.n / st.m:.0%}: target size {target_size} is too small")
        sel = select_groups(costs, round(min(frac, 1.0) * sum(c.numel() for c in costs)))
    else:
        sel = select_elements(costs, n_remove)
    return sel, _finite_sum(costs, sel)


def _finite_sum(costs: list[torch.Tensor], selections: list[torch.Tensor]) -> float:
    """Sum of the selected costs, leaving out the −inf of entries removed in earlier shots (one sync per device)."""
    sums: dict = {}
    for c, s in zip(costs, selections):
        part = torch.where(s.to(c.device) & torch.isfinite(c), c, 0).sum(dtype=torch.float64)
        sums[c.device] = sums.get(c.device, 0) + part
    return float(sum(float(v) for v in sums.values()))


def _update_structured(layers: list[LayerProblem], selections: list, opts, where: Placement, progress) -> None:
    """§3.4 for rows and columns: this rank's layers, one at a time, each freed once written."""
    moved: dict = {}
    mine = where.mine(layers)
    for k, i in enumerate(mine):
        layer, (rows, cols) = layers[i], selections[i]
        where.fetch(layer, moved)
        write_back(layer.lin, apply_structured(layer, rows.to(where.device), cols.to(where.device), opts))
        layer.W = layer.A_inv = layer.G_inv = None
        if progress:
            progress("update", k + 1, len(mine))


def _update_elements(layers: list[LayerProblem], selections: list, opts, where: Placement, progress=None) -> None:
    """§3.4 for elements and N:M: this rank's layers in batches of same-shaped layers. Consumes ``selections``
    (emptied, like every layer's costs, once the removed entries are known)."""
    moved: dict = {}
    mine = where.mine(layers)
    drops = [element_drop(layers[i], selections[i].to(where.device), opts) for i in mine]
    for l in layers:
        l.costs = None
    selections.clear()

    own = [layers[i] for i in mine]
    written = [0]

    def write(layer: LayerProblem, W_new: torch.Tensor) -> None:
        write_back(layer.lin, W_new)
        layer.W = layer.A_inv = layer.G_inv = layer.nm_drop = None
        written[0] += 1
        if progress:
            progress("update", written[0], len(own))

    batch = opts.update_batch_layers or (len(own) if where.device.type == "cuda" else 1)
    apply_elements_grouped(own, drops, opts, batch, lambda layer: where.fetch(layer, moved), write)


def _broadcast_weights(layers: list[LayerProblem], where: Placement, dp) -> float:
    """Data-parallel: each layer's owner sends its new weights to every rank; returns the seconds taken."""
    t0 = time.perf_counter()
    for l in layers:
        distributed.broadcast_tensors([p.data for p in (l.lin.weight, l.lin.bias) if p is not None], dp,
                                      src=where.owners[l.name])
    return time.perf_counter() - t0


def _report(model, adapter, shot, num_shots, target_size, estimated, seconds, escalations, extra=None) -> ShotReport:
    size, per_layer, per_type = model_size(model, adapter)
    return ShotReport(shot=shot, num_shots=num_shots, target_size=target_size, achieved_size=size,
                      estimated_loss=estimated, layer_sizes=per_layer, type_sizes=per_type, seconds=seconds,
                      damping_escalations=escalations, extra=extra or {})


def _coupled_shot(model, factors, linears, adapter, opts, device, target_size, shot, num_shots,
                  seconds, progress=None) -> ShotReport:
    """The coupled-structure shot (surgeon_core.coupled): costs, global greedy selection and updates per unit."""
    t0 = time.perf_counter()
    layers = list(get_submodule(model, adapter.layers))
    if getattr(model.config, "layer_num_heads", None) is not None:
        raise ValueError("coupled pruning of a materialized model (per-layer head counts) is not supported; "
                         "prune the zeroed model, then materialize")
    if any(not get_submodule(layer, n).weight.numel() for layer in layers for n in adapter.linears):
        raise ValueError("coupled pruning of a materialized model (a layer without FFN units) is not supported; "
                         "prune the zeroed model, then materialize")
    layout = tuple(opts.head_layout) if opts.head_layout else adapter.head_layout(model.config)

    a_moved: dict = {}  # one device copy of an input factor shared by q/k/v or gate/up (its inverse is cached by id)

    def get_factors(i, name):
        full = f"{adapter.layers}.{i}.{name}"
        A, G = factors_for(factors, full, linears[full].weight, device)
        if A is not None:
            A = a_moved.setdefault(factors.group_of[full], A)
        return A, (None if opts.spec.curvature == "activations" else G)

    total = sum(lin.weight.numel() for lin in linears.values())
    estimated, escalations = coupled.coupled_shot(
        layers, adapter, layout, get_factors=get_factors, augmented=lambda lin: augmented(lin, device),
        write_back=write_back, n_remove=round((1.0 - target_size) * total), kind=opts.spec.cost_kind,
        update=opts.spec.update, damping_a=opts.damping_a, damping_g=opts.damping_g, max_correlate=opts.max_correlate,
        inverse_dtype=opts.inverse_dtype, offload="cpu" if device.type == "cuda" else None, score=opts.coupled_score,
        progress=progress)
    seconds["coupled"] = time.perf_counter() - t0
    return _report(model, adapter, shot, num_shots, target_size, estimated, seconds, escalations)


def run_step(
    model: nn.Module,
    windows: torch.Tensor | None,
    *,
    options: PruneOptions,
    step: Step,
    adapter: ArchitectureAdapter | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    process_group=None,
) -> ShotReport:
    """Prune one step of the plan (surgeon_core.schedule) in place: a layer-wise baseline's single pass, or one
    shot of the multi-shot algorithm with the curvature re-estimated at the current weights."""
    adapter = adapter or adapter_for(model)
    if not options.layerwise:
        return prune_shot(model, windows, options=options, target_size=step.target_size, shot=step.shot,
                          num_shots=step.num_shots, adapter=adapter, progress=progress, process_group=process_group)
    if distributed.resolve(process_group) is not None:
        raise ValueError(f"{options.method} is a layer-wise baseline: it does not run data-parallel")
    if step.num_shots != 1:
        raise ValueError(f"{options.method} is a layer-wise baseline: it prunes in one step, not {step.num_shots}")
    st = options.structure_spec
    t0 = time.perf_counter()
    prune_model_layerwise(
        model, windows, method=options.method,
        sparsity=1.0 - step.target_size if st.kind != "nm" else 1 - st.n / st.m,
        n_m=(st.n, st.m) if st.kind == "nm" else None, batch_size=options.batch_size, device=options.device,
        block_size=options.block_size, dampening_frac=options.baseline_damping,
        true_sequential=options.true_sequential, stats_dtype=options.baseline_dtype, progress=progress)
    size, per_layer, per_type = model_size(model, adapter)
    return ShotReport(shot=1, num_shots=1, target_size=step.target_size, achieved_size=size,
                      estimated_loss=float("nan"), layer_sizes=per_layer, type_sizes=per_type,
                      seconds={"total": time.perf_counter() - t0}, extra={"layerwise": True})
