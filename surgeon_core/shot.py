"""One pruning shot over a whole model, and the multi-shot schedule (docs/method.md §1.6, paper Algorithm 1).

A shot: estimate K-FAC factors at the current weights → per-layer removal costs → one global threshold →
correlated OBS updates (or plain zeroing for the OBD/magnitude baselines) → removed weights exactly zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import distributed
from .adapters import ArchitectureAdapter, adapter_for, prunable_linears
from .allocation import select_elements, select_groups, select_structures
from .baselines import prune_model_layerwise
from .costs import column_costs, element_costs, nm_groups, row_costs
from .curvature import KFACFactors, estimate_kfac
from .linalg import damped_inverse, is_positive_definite
from .methods import METHODS, MethodSpec, PruneOptions, Structure
from .schedule import Step
from .update import newton_step, obs_update_columns, obs_update_elements_concurrent, obs_update_rows

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


class NonFiniteCurvatureError(FloatingPointError):
    """Calibration produced NaN/Inf curvature factors (an overflow, typically under fp16/bf16 compute).

    Raised before any weight is changed, so the caller may rerun the shot in fp32 on the same model."""


class RoundedCurvatureError(NonFiniteCurvatureError):
    """Reduced-precision factor matmuls whose per-batch results were rounded (bf16 Gram on a CPU) left curvature
    factors that are not positive definite even with the configured damping. Raised before any weight is changed:
    rerun the shot with fp32 factor matmuls."""


def check_factors(factors: KFACFactors, compute_dtype: torch.dtype | None = None, *,
                  rounded_damping: tuple[float, float] | None = None) -> None:
    """Raise :class:`NonFiniteCurvatureError` if any K-FAC factor holds NaN/Inf.

    ``rounded_damping`` = (damping_a, damping_g), given when the factor matmuls rounded each batch's result to bf16
    (no fp32-output bf16 matmul on that device): then every damped factor must also be positive definite (a float64
    Cholesky), else :class:`RoundedCurvatureError` - rounded entries break the Gram matrices' positive
    semi-definiteness, which ruined a coupled A1 run on the CPU (BENCHMARKS.md) while escalating damping hid it."""
    tensors = [*factors.A.items(), *factors.G.items()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(M).all().to("cpu") for _, M in tensors])
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
        dtype = str(compute_dtype).replace("torch.", "") if compute_dtype is not None else "float32"
        raise NonFiniteCurvatureError(
            f"calibration overflow: curvature factors of {len(bad)} layer(s) hold NaN/Inf under {dtype} compute "
            f"(first: {bad[0]})")
    if rounded_damping is None:
        return
    bad = []
    for kind, group, frac in (("A", factors.A, rounded_damping[0]), ("G", factors.G, rounded_damping[1])):
        for name, M in group.items():
            if M.dim() != 2:  # diagonal-only factors hold no off-diagonal rounding
                continue
            if not is_positive_definite(M, frac):
                bad.append(f"{kind}[{name}]")
    if bad:
        raise RoundedCurvatureError(
            f"bf16 factor matmuls on {tensors[0][1].device.type} rounded each "
            f"batch's Gram matrix to bf16: {len(bad)} damped factor(s) are not positive definite (first: {bad[0]})")


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
        nz, n = int(torch.count_nonzero(lin.weight)), lin.weight.numel()
        per_layer[name] = nz / n
        t = adapter.layer_type(name)
        type_tot[t] = type_tot.get(t, 0) + n
        type_nz[t] = type_nz.get(t, 0) + nz
        total += n
        nonzero += nz
    return nonzero / total, per_layer, {t: type_nz[t] / type_tot[t] for t in type_tot}


def _augmented(lin: nn.Linear, device) -> torch.Tensor:
    W = lin.weight.detach().to(device=device, dtype=torch.float32)  # (R, C)
    if lin.bias is None:
        return W
    return torch.cat([W, lin.bias.detach().to(device=device, dtype=torch.float32)[:, None]], dim=1)  # (R, C+1)


@torch.no_grad()
def _write_back(lin: nn.Linear, W_aug: torch.Tensor) -> None:
    C = lin.in_features
    if not torch.isfinite(W_aug).all():
        raise FloatingPointError("pruning produced NaN/Inf weights")
    lin.weight.copy_(W_aug[:, :C].to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(W_aug[:, C].to(lin.bias.dtype))


@dataclass
class _Layer:
    name: str
    lin: nn.Linear
    W: torch.Tensor  # (R, C') working weight (sub-problem for structured)
    rows: torch.Tensor | None = None  # alive row indices (structured)
    cols: torch.Tensor | None = None  # alive column indices incl. bias column (structured)
    n_weight_cols: int = 0  # alive weight columns in the sub-problem
    A_inv: torch.Tensor | None = None
    G_inv: torch.Tensor | None = None
    costs: torch.Tensor | None = None
    row_cost: torch.Tensor | None = None
    col_cost: torch.Tensor | None = None
    nm_drop: torch.Tensor | None = None
    extra_gain: float = 0.0  # first-order term: predicted loss change of the Newton step alone (≤ 0)


def _factors_for(factors: KFACFactors | None, name: str, W: torch.Tensor, device):
    R, Cp = W.shape
    if factors is None:
        return None, None
    A = factors.A[factors.group_of[name]].to(device)
    G = factors.G.get(name)
    G = G.to(device) if G is not None else torch.eye(R, device=device)
    return A, G


def _gradient_for(factors: KFACFactors | None, name: str, opts, device) -> torch.Tensor | None:
    """The scaled mean loss gradient s·∇W (R, C') of one linear when the first-order term is on, else None."""
    if not opts.first_order or factors is None or name not in factors.grads:
        return None
    return factors.grads[name].to(device) * opts.first_order_scale


def _cached_inverse(cache: dict, key, M: torch.Tensor, frac: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Damped inverse of an input factor shared by q/k/v or gate/up: computed once per shot."""
    if key not in cache:
        cache[key] = damped_inverse(M, frac, dtype=dtype)
    return cache[key]


def _prepare_structured(name, lin, W, A, G, opts, spec, device, a_key, cache, grad=None) -> tuple[_Layer, int]:
    C = lin.in_features
    bias = lin.bias is not None
    alive_r = W.abs().sum(dim=1) > 0
    alive_c = W[:, :C].abs().sum(dim=0) > 0
    if A is not None:
        alive_c &= torch.diagonal(A)[:C] > 0
    if G is not None and spec.curvature == "kfac":
        alive_r &= torch.diagonal(G) > 0
    rows = torch.nonzero(alive_r).flatten()
    wcols = torch.nonzero(alive_c).flatten()
    cols = torch.cat([wcols, torch.tensor([C], device=device)]) if bias else wcols
    Wsub = W[rows][:, cols]
    layer = _Layer(name, lin, Wsub, rows=rows, cols=cols, n_weight_cols=wcols.numel())
    escalations = 0
    Asub = A[cols][:, cols] if A is not None else None
    Gsub = G[rows][:, rows] if G is not None else None
    if spec.cost_kind == "obs" and rows.numel() and wcols.numel():
        layer.G_inv, used_g = damped_inverse(Gsub, opts.damping_g, dtype=opts.inverse_dtype)
        key = (a_key, cols.numel(), hash(tuple(cols.tolist())))
        layer.A_inv, used_a = _cached_inverse(cache, key, Asub, opts.damping_a, opts.inverse_dtype)
        escalations += int(used_g != opts.damping_g) + int(used_a != opts.damping_a)
    rc = torch.full((W.shape[0],), float("-inf"), device=device)
    cc = torch.full((C,), float("-inf"), device=device)
    if rows.numel() and wcols.numel():
        linear_r = linear_c = 0.0
        if grad is not None:
            gsub = grad[rows][:, cols]
            if spec.cost_kind == "obs":  # OBS at the Newton point of the sub-problem: W' = W − G⁻¹ s∇W A⁻¹
                U = newton_step(gsub, layer.G_inv, layer.A_inv)
                layer.extra_gain = -0.5 * float((gsub * U).sum())
                Wsub = Wsub - U
                layer.W = Wsub
            else:  # no update (K-OBD): removing w costs −s⟨∇w, w⟩ + ½ wᵀFw
                gw = gsub * Wsub
                linear_r, linear_c = -gw.sum(dim=1), -gw.sum(dim=0)[: wcols.numel()]
        rc[rows] = row_costs(Wsub, kind=spec.cost_kind, A=Asub, G=Gsub, G_inv=layer.G_inv) + linear_r
        cc[wcols] = column_costs(Wsub, kind=spec.cost_kind, A=Asub, G=Gsub,
                                 A_inv=layer.A_inv)[: wcols.numel()] + linear_c
    layer.row_cost, layer.col_cost = rc, cc
    return layer, escalations


def _prepare_elements(name, lin, W, A, G, opts, spec, device, a_key, cache, grad=None) -> tuple[_Layer, int]:
    C = lin.in_features
    layer = _Layer(name, lin, W, n_weight_cols=C)
    escalations = 0
    if spec.cost_kind == "obs":
        layer.G_inv, used_g = damped_inverse(G, opts.damping_g, dtype=opts.inverse_dtype)
        layer.A_inv, used_a = _cached_inverse(cache, a_key, A, opts.damping_a, opts.inverse_dtype)
        escalations += int(used_g != opts.damping_g) + int(used_a != opts.damping_a)
    zero = W[:, :C] == 0  # removed in earlier shots: always removed again
    if grad is not None and spec.cost_kind == "obs":  # OBS at the Newton point W' = W − G⁻¹ s∇W A⁻¹
        U = newton_step(grad, layer.G_inv, layer.A_inv)
        layer.extra_gain = -0.5 * float((grad * U).sum())
        layer.W = W = W - U
    costs = element_costs(W, kind=spec.cost_kind, A=A, G=G, A_inv=layer.A_inv, G_inv=layer.G_inv)[:, :C]
    if grad is not None:
        if spec.cost_kind != "obs":  # no update (K-OBD): removing w costs −s∇w·w + ½F w²
            costs = costs - (grad * W)[:, :C]
        costs = costs.masked_fill(zero, float("-inf"))
    st = opts.structure_spec
    if st.kind == "nm":
        layer.costs, layer.nm_drop = nm_groups(costs, st.n, st.m)
    else:
        layer.costs = costs
    return layer, escalations


def _apply_structured(layer: _Layer, row_sel: torch.Tensor, col_sel: torch.Tensor, opts, spec) -> torch.Tensor:
    lin, C = layer.lin, layer.lin.in_features
    R_full = lin.out_features
    Cp = C + (1 if lin.bias is not None else 0)
    out = torch.zeros(R_full, Cp, device=layer.W.device)
    if layer.rows.numel() == 0 or layer.n_weight_cols == 0:
        return out
    Wsub = layer.W
    # positions inside the sub-problem of the rows/columns chosen this shot
    r_pos = torch.nonzero(row_sel[layer.rows]).flatten()
    c_pos = torch.nonzero(col_sel[layer.cols[: layer.n_weight_cols]]).flatten()
    if spec.update and opts.structured_update == "sum":
        # the reference code's form: row and column updates both computed from the current W, then summed
        dW = torch.zeros_like(Wsub)
        if r_pos.numel():
            dW += obs_update_rows(Wsub, layer.G_inv, r_pos, max_correlate=opts.max_correlate) - Wsub
        if c_pos.numel():
            dW += obs_update_columns(Wsub, layer.A_inv, c_pos, max_correlate=opts.max_correlate) - Wsub
        Wsub = Wsub + dW
        Wsub[r_pos, :] = 0
        Wsub[:, c_pos] = 0
    elif spec.update:
        # rows first, then the columns of the row-updated W (every removal is compensated)
        if r_pos.numel():
            Wsub = obs_update_rows(Wsub, layer.G_inv, r_pos, max_correlate=opts.max_correlate)
        if c_pos.numel():
            Wsub = obs_update_columns(Wsub, layer.A_inv, c_pos, max_correlate=opts.max_correlate)
    else:
        Wsub = Wsub.clone()
        Wsub[r_pos, :] = 0
        Wsub[:, c_pos] = 0
    out[layer.rows.unsqueeze(1), layer.cols.unsqueeze(0)] = Wsub
    return out


def _element_drop(layer: _Layer, sel: torch.Tensor, opts) -> torch.Tensor:
    st = opts.structure_spec
    if st.kind == "nm":  # sel marks groups; expand to the entries chosen inside each group
        return layer.nm_drop & sel.repeat_interleave(st.m, dim=1)
    return sel


def _apply_elements_grouped(layers: list[_Layer], drops: list[torch.Tensor], opts, spec, batch_layers: int,
                            prepare: Callable[[_Layer], None], write: Callable[[_Layer, torch.Tensor], None]) -> None:
    """Element removal: OBS updates of same-shaped layers solved as one batch of at most ``batch_layers``.

    ``prepare(layer)`` brings a layer's working weight and inverses to the device just before its batch, and
    ``write(layer, W_new)`` stores the result right after it, so only one batch is alive at a time.
    """
    if not spec.update:
        for l, d in zip(layers, drops):
            prepare(l)
            W = l.W.clone()
            W[:, : d.shape[1]][d] = 0
            write(l, W)
        return
    by_shape: dict[tuple, list[int]] = {}
    for i, l in enumerate(layers):
        shape = (l.lin.out_features, l.lin.in_features + (l.lin.bias is not None))
        by_shape.setdefault((l.name.rsplit(".", 1)[-1], shape), []).append(i)
    parts = [idx[s : s + batch_layers] for idx in by_shape.values() for s in range(0, len(idx), batch_layers)]
    at_once = opts.update_concurrent_batches
    for g in range(0, len(parts), at_once):
        group = parts[g : g + at_once]
        for part in group:
            for i in part:
                prepare(layers[i])
        problems = [(torch.stack([layers[i].W for i in part]), torch.stack([drops[i] for i in part]),
                     torch.stack([layers[i].G_inv for i in part]), torch.stack([layers[i].A_inv for i in part]))
                    for part in group]
        new_W = obs_update_elements_concurrent(problems, max_correlate=opts.max_correlate)  # one: no side streams
        del problems
        for part, W in zip(group, new_W):
            for k, i in enumerate(part):
                write(layers[i], W[k])
        del new_W


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


def _owners(linears: dict[str, nn.Linear], adapter: ArchitectureAdapter, dp) -> dict[str, int]:
    """The rank that solves each linear: whole decoder layers, round-robin (so q/k/v and gate/up, which share an
    input factor, share its damped inverse too). Every linear is rank 0's without ``dp``."""
    if dp is None:
        return dict.fromkeys(linears, 0)
    prefix = adapter.layers + "."
    return {name: int(name[len(prefix):].split(".", 1)[0]) % dp.world_size for name in linears}


def _cost_stub(name: str, lin: nn.Linear, opts, device) -> _Layer:
    """A layer solved on another rank: only its cost tensors, filled by that rank's broadcast."""
    R, C = lin.out_features, lin.in_features
    empty = lambda *shape: torch.empty(shape, device=device)  # noqa: E731
    st = opts.structure_spec
    if st.kind == "structured":
        return _Layer(name, lin, None, row_cost=empty(R), col_cost=empty(C))
    return _Layer(name, lin, None, costs=empty(R, C // st.m) if st.kind == "nm" else empty(R, C))


def _share_costs(layers: list[_Layer], owners: dict[str, int], dp) -> None:
    """Every rank gets every layer's costs from the rank that computed them."""
    for l in layers:
        tensors = [l.row_cost, l.col_cost] if l.costs is None else [l.costs]
        distributed.broadcast_tensors(tensors, dp, src=owners[l.name])


_PARKED = ("W", "A_inv", "G_inv")


def _park_device(linears: dict[str, nn.Linear], owners: dict[str, int], rank: int, spec, opts, device,
                 factors: KFACFactors | None) -> torch.device | str | None:
    """Where the factor inverses (and first-order working weights) wait between the cost and update phases.

    On CUDA, when they would not fit in the free memory plus the factors' (freed one by one as the inverses are
    made; a 7B model has ~64 GB of fp32 factors and as many bytes of inverses), they are parked elsewhere as each
    layer's costs are done and brought back one layer at a time for its update. With factors spread over several
    GPUs (``factor_device="spread"``) and room on each, ``"factor"``: each layer's inverses wait on the GPU that held
    its factors (device-to-device copies instead of host transfers); otherwise the CPU. None: they stay.
    """
    if device.type != "cuda" or spec.cost_kind != "obs":
        return None
    here = torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
    need: dict[torch.device, int] = {}
    for name, lin in linears.items():
        if owners[name] != rank:
            continue
        R, Cp = lin.out_features, lin.in_features + (lin.bias is not None)
        dev = factors.G[name].device if factors is not None and name in factors.G else here
        need[dev] = need.get(dev, 0) + 4 * (R * R + Cp * Cp) + (4 * R * Cp if opts.first_order else 0)

    def fits(dev: torch.device, bytes_needed: int) -> bool:
        if dev.type != "cuda":
            return False
        factor_bytes = sum(t.numel() * t.element_size() for d in (factors.A, factors.G) for t in d.values()
                           if t.device == dev) if factors is not None else 0
        free, _ = torch.cuda.mem_get_info(dev)
        # each factor is freed after its last use while the inverses accumulate: the factors' memory counts as free
        return bytes_needed <= 0.8 * (free + factor_bytes)

    if fits(here, sum(need.values())):
        return None
    if set(need) != {here} and all(fits(dev, n) for dev, n in need.items()):
        return "factor"
    return torch.device("cpu")


def _restore_working_weight(layer: _Layer, device) -> None:
    """Re-read a dropped working weight: the model's weight (bias column appended), cut to the structured
    sub-problem's alive rows/columns; identical to the one the costs were computed on (the model is unchanged
    until the update writes it)."""
    if layer.W is not None:
        return
    W = _augmented(layer.lin, device)
    if layer.rows is not None:
        W = W[layer.rows][:, layer.cols]
    layer.W = W


def _move_layer(layer: _Layer, device: torch.device, moved: dict) -> None:
    """Move a layer's working weight and inverses to ``device``: parked on the host after its costs, back for its
    update. The A⁻¹ shared by consecutive layers of one input group moves once (``moved`` holds the last source
    tensor and its copy; holding the source also keeps it from being freed and its identity reused)."""
    for attr in _PARKED:
        t = getattr(layer, attr)
        if t is None or t.device == device:
            continue
        if attr == "A_inv":
            if moved.get("src") is not t:
                moved["src"], moved["dst"] = t, t.to(device)
            layer.A_inv = moved["dst"]
        else:
            setattr(layer, attr, t.to(device))


def _prune_shot(model, windows, *, options, target_size, shot, num_shots, adapter, progress, dp) -> ShotReport | None:
    """The shot on one rank (``dp`` None: the only one); ranks other than 0 stop after the curvature pass."""
    opts, spec = options, options.spec
    if opts.layerwise:
        raise ValueError(f"{opts.method} is a layer-wise baseline: call surgeon_core.prune() instead")
    device = torch.device(opts.device) if opts.device else next(model.parameters()).device
    linears = prunable_linears(model, adapter)
    seconds: dict[str, float] = {}
    factors = None
    if spec.curvature != "none":
        if windows is None:
            raise ValueError(f"method {opts.method} needs calibration data")
        factors = estimate_kfac(
            model, windows, adapter=adapter, fisher=opts.fisher, fisher_samples=opts.fisher_samples,
            batch_size=opts.batch_size, device=device, factor_device=opts.factor_device or device,
            autocast_dtype=opts.autocast_dtype, gram_dtype=opts.gram_dtype, seed=opts.seed + shot,
            checkpoint_layers=opts.checkpoint_layers,
            collect_gradients=spec.curvature == "kfac", collect_weight_grads=opts.first_order,
            progress=(lambda i, n: progress("curvature", i, n)) if progress else None,
            process_group=dp.group if dp else None,
        )
        seconds["curvature"] = factors.seconds["curvature"]
        if "allreduce" in factors.seconds:
            seconds["allreduce"] = factors.seconds["allreduce"]
        rounded = opts.gram_dtype not in (None, torch.float32) and device.type != "cuda"
        check_factors(factors, opts.autocast_dtype,
                      rounded_damping=(opts.damping_a, opts.damping_g) if rounded else None)

    if opts.structure_spec.kind == "coupled":
        if dp is not None and not dp.is_main:
            return None  # rank 0 solves the coupled shot; prune_shot broadcasts its weights
        return _coupled_shot(model, factors, linears, adapter, opts, spec, device, target_size, shot, num_shots,
                             seconds)
    t0 = time.perf_counter()
    structured = opts.structure_spec.kind == "structured"
    layers: list[_Layer] = []
    escalations = 0
    inverse_cache: dict = {}
    owners = _owners(linears, adapter, dp)
    rank = dp.rank if dp else 0
    last_use = {factors.group_of[n]: i for i, n in enumerate(linears)} if factors is not None else {}
    park = _park_device(linears, owners, rank, spec, opts, device, factors)
    moved: dict = {}
    for i, (name, lin) in enumerate(linears.items()):
        if owners[name] != rank:
            layers.append(_cost_stub(name, lin, opts, device))
            continue
        park_here = factors.G[name].device if park == "factor" else park
        W = _augmented(lin, device)
        A, G = _factors_for(factors, name, W, device)
        if spec.curvature == "activations":
            G = None
        prep = _prepare_structured if structured else _prepare_elements
        a_key = factors.group_of[name] if factors is not None else name
        layer, esc = prep(name, lin, W, A, G, opts, spec, device, a_key, inverse_cache,
                          grad=_gradient_for(factors, name, opts, device))
        del A, G, W
        if factors is not None:  # free every factor after its last use (7B: ~64 GB of fp32 factors)
            factors.G.pop(name, None)
            if last_use.get(a_key) == i:
                factors.A.pop(a_key, None)
        if layer.W is not None and not opts.first_order:
            layer.W = None  # the working weight is re-read from the model for the update (saves 26 GB on 7B)
        if park_here is not None:
            _move_layer(layer, park_here, moved)
        if i + 1 < len(linears) and a_key != (factors.group_of[list(linears)[i + 1]] if factors else None):
            inverse_cache.clear()  # the next linear reads another input: drop this group's inverse
        escalations += esc
        layers.append(layer)
        if progress:
            progress("costs", i + 1, len(linears))
    del factors
    extra_gain = sum(l.extra_gain for l in layers)
    if dp is not None:
        _share_costs(layers, owners, dp)
        sums = distributed.all_reduce_(torch.tensor([float(escalations), extra_gain], dtype=torch.float64,
                                                    device=device), dp)
        escalations, extra_gain = int(sums[0].item()), float(sums[1].item())
    seconds["costs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    total = sum(lin.weight.numel() for lin in linears.values())
    n_remove = round((1.0 - target_size) * total)
    estimated = 0.0
    if structured:
        row_sel, col_sel = select_structures([l.row_cost for l in layers], [l.col_cost for l in layers], n_remove)
        for l, rs, cs in zip(layers, row_sel, col_sel):
            rs, cs = rs.to(device), cs.to(device)
            estimated += float(l.row_cost[rs & torch.isfinite(l.row_cost)].sum())
            estimated += float(l.col_cost[cs & torch.isfinite(l.col_cost)].sum())
        selections = list(zip(row_sel, col_sel))
    elif opts.structure_spec.kind == "nm":
        st = opts.structure_spec
        groups_total = sum(l.costs.numel() for l in layers)
        frac = (1.0 - target_size) / (1.0 - st.n / st.m)
        if frac > 1.0 + 1e-9:
            raise ValueError(f"{st} sparsity keeps at least {st.n / st.m:.0%}: target size {target_size} is too small")
        sel = select_groups([l.costs for l in layers], round(min(frac, 1.0) * groups_total))
        estimated = _finite_sum([l.costs for l in layers], sel)
        selections = sel
    else:
        sel = select_elements([l.costs for l in layers], n_remove)
        estimated = _finite_sum([l.costs for l in layers], sel)
        selections = sel
    seconds["allocation"] = time.perf_counter() - t0

    extra = {}
    if opts.first_order:
        extra["first_order_gain"] = extra_gain  # the Newton steps' predicted change
    t0 = time.perf_counter()
    moved = {}
    mine = [i for i, l in enumerate(layers) if owners[l.name] == rank]
    if structured:
        for k, i in enumerate(mine):
            l, s = layers[i], selections[i]
            if park is not None:
                _move_layer(l, device, moved)
            _restore_working_weight(l, device)
            _write_back(l.lin, _apply_structured(l, s[0].to(device), s[1].to(device), opts, spec))
            l.W = l.A_inv = l.G_inv = None  # free memory as we go
            if progress:
                progress("update", k + 1, len(mine))
    else:
        own = [layers[i] for i in mine]
        drops = [_element_drop(layers[i], selections[i].to(device), opts) for i in mine]
        for l in layers:
            l.costs = None  # the selection is made: free the (R, C) cost matrices before the updates
        selections = None

        def prepare(l: _Layer) -> None:
            if park is not None:
                _move_layer(l, device, moved)
            _restore_working_weight(l, device)

        def write(l: _Layer, W_new: torch.Tensor) -> None:
            _write_back(l.lin, W_new)
            l.W = l.A_inv = l.G_inv = l.nm_drop = None

        batch = opts.update_batch_layers or (len(own) if device.type == "cuda" else 1)
        _apply_elements_grouped(own, drops, opts, spec, batch, prepare, write)
    seconds["update"] = time.perf_counter() - t0
    if dp is not None:  # each layer's owner sends its new weights to every rank
        t0 = time.perf_counter()
        for l in layers:
            distributed.broadcast_tensors([p.data for p in (l.lin.weight, l.lin.bias) if p is not None], dp,
                                          src=owners[l.name])
        seconds["broadcast"] = time.perf_counter() - t0

    size, per_layer, per_type = model_size(model, adapter)
    return ShotReport(shot=shot, num_shots=num_shots, target_size=target_size, achieved_size=size,
                      estimated_loss=estimated, layer_sizes=per_layer, type_sizes=per_type,
                      seconds=seconds, damping_escalations=escalations, extra=extra)


def _finite_sum(costs: list[torch.Tensor], selections: list[torch.Tensor]) -> float:
    """Sum of the selected costs, leaving out the −inf of entries removed in earlier shots (one sync per device)."""
    sums: dict = {}
    for c, s in zip(costs, selections):
        part = torch.where(s.to(c.device) & torch.isfinite(c), c, 0).sum(dtype=torch.float64)
        sums[c.device] = sums.get(c.device, 0) + part
    return float(sum(float(v) for v in sums.values()))


def _coupled_shot(model, factors, linears, adapter, opts, spec, device, target_size, shot, num_shots,
                  seconds) -> ShotReport:
    """The coupled-structure shot (surgeon_core.coupled): costs, global greedy selection and updates per unit."""
    from .adapters import get_submodule
    from .coupled import coupled_shot

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
        A, G = _factors_for(factors, full, linears[full].weight, device)
        if A is not None:
            A = a_moved.setdefault(factors.group_of[full], A)
        return A, (None if spec.curvature == "activations" else G)

    total = sum(lin.weight.numel() for lin in linears.values())
    estimated, escalations = coupled_shot(
        layers, adapter, layout, get_factors=get_factors, augmented=lambda lin: _augmented(lin, device),
        write_back=_write_back, n_remove=round((1.0 - target_size) * total), kind=spec.cost_kind,
        update=spec.update, damping_a=opts.damping_a, damping_g=opts.damping_g, max_correlate=opts.max_correlate,
        inverse_dtype=opts.inverse_dtype, offload="cpu" if device.type == "cuda" else None, score=opts.coupled_score)
    seconds["coupled"] = time.perf_counter() - t0
    size, per_layer, per_type = model_size(model, adapter)
    return ShotReport(shot=shot, num_shots=num_shots, target_size=target_size, achieved_size=size,
                      estimated_loss=estimated, layer_sizes=per_layer, type_sizes=per_type, seconds=seconds,
                      damping_escalations=escalations)


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
        true_sequential=options.true_sequential, stats_dtype=options.baseline_dtype,
        progress=(lambda i, n: progress("layers", i, n)) if progress else None)
    size, per_layer, per_type = model_size(model, adapter)
    return ShotReport(shot=1, num_shots=1, target_size=step.target_size, achieved_size=size,
                      estimated_loss=float("nan"), layer_sizes=per_layer, type_sizes=per_type,
                      seconds={"total": time.perf_counter() - t0}, extra={"layerwise": True})
