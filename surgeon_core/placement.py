"""Where a shot's per-layer work happens: which rank solves each linear, where the damped inverses wait between the
cost and update phases, and how the costs reach every rank.

Data-parallel (surgeon_core.distributed): whole decoder layers are shared round-robin over the ranks; each owner
broadcasts its layers' costs, so every rank applies the same global threshold, and later its new weights.

FSDP-sharded weights (``torch.distributed.fsdp.fully_shard``: DTensor parameters, each rank holding a slice): for
the costs and updates each owner gathers its layers' whole weights (:func:`gather_owned`); afterwards the new weights
go back into every rank's slices (:func:`scatter_back`). Both walk all linears in the same order on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import time

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: nothing is ever sharded
    DTensor = ()

from . import distributed
from .adapters import ArchitectureAdapter, get_submodule
from .curvature import KFACFactors
from .subproblem import LayerProblem, augmented

__all__ = ["Placement", "owners", "cost_stub", "share_costs", "park_device", "move_layer", "restore_working_weight",
           "shard_weights", "sharded_weights", "gather_owned", "scatter_back", "shard_rows", "local_part"]

PARKED = ("W", "A_inv", "G_inv")  # what waits, per layer, between the cost and the update phase


def owners(linears: dict[str, nn.Linear], adapter: ArchitectureAdapter, dp) -> dict[str, int]:
    """The rank that solves each linear: whole decoder layers, round-robin (so q/k/v and gate/up, which share an
    input factor, share its damped inverse too). Every linear is rank 0's without ``dp``."""
    if dp is None:
        return dict.fromkeys(linears, 0)
    prefix = adapter.layers + "."
    return {name: int(name[len(prefix):].split(".", 1)[0]) % dp.world_size for name in linears}


def cost_stub(name: str, lin: nn.Linear, opts, device) -> LayerProblem:
    """A layer solved on another rank: only its cost tensors, filled by that rank's broadcast."""
    R, C = lin.out_features, lin.in_features
    empty = lambda *shape: torch.empty(shape, device=device)  # noqa: E731
    st = opts.structure_spec
    if st.kind == "structured":
        return LayerProblem(name, lin, None, row_cost=empty(R), col_cost=empty(C))
    return LayerProblem(name, lin, None, costs=empty(R, C // st.m) if st.kind == "nm" else empty(R, C))


def share_costs(layers: list[LayerProblem], owners: dict[str, int], dp) -> None:
    """Every rank gets every layer's costs from the rank that computed them."""
    for l in layers:
        tensors = [l.row_cost, l.col_cost] if l.costs is None else [l.costs]
        distributed.broadcast_tensors(tensors, dp, src=owners[l.name])


def park_device(linears: dict[str, nn.Linear], owners: dict[str, int], rank: int, spec, opts, device,
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


def restore_working_weight(layer: LayerProblem, device) -> None:
    """Re-read a dropped working weight: the model's weight (bias column appended), cut to the structured
    sub-problem's alive rows/columns; identical to the one the costs were computed on (the model is unchanged
    until the update writes it)."""
    if layer.W is not None:
        return
    W = augmented(layer.lin, device)
    if layer.rows is not None:
        W = W[layer.rows][:, layer.cols]
    layer.W = W


def move_layer(layer: LayerProblem, device: torch.device, moved: dict) -> None:
    """Move a layer's working weight and inverses to ``device``: parked after its costs, back for its update. The
    A⁻¹ shared by consecutive layers of one input group moves once (``moved`` holds the last source tensor and its
    copy; holding the source also keeps it from being freed and its identity reused)."""
    for attr in PARKED:
        t = getattr(layer, attr)
        if t is None or t.device == device:
            continue
        if attr == "A_inv":
            if moved.get("src") is not t:
                moved["src"], moved["dst"] = t, t.to(device)
            layer.A_inv = moved["dst"]
        else:
            setattr(layer, attr, t.to(device))


def shard_weights(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """Shard every decoder layer, and the module holding them (embeddings, final norm), with FSDP2 over the default
    process group; the vocabulary head stays whole on every rank (the loss reads its weight directly)."""
    from torch.distributed.fsdp import fully_shard

    for layer in get_submodule(model, adapter.layers):
        fully_shard(layer)
    fully_shard(get_submodule(model, adapter.layers.rpartition(".")[0]))


def sharded_weights(linears: dict[str, nn.Linear]) -> bool:
    """Whether the linears' weights are FSDP-sharded (DTensor parameters)."""
    return any(isinstance(lin.weight, DTensor) for lin in linears.values())


def gather_owned(linears: dict[str, nn.Linear], owners: dict[str, int], rank: int) -> dict[str, dict[str, DTensor]]:
    """Every sharded weight and bias gathered whole on every rank (one all-gather each, in the same order on all
    ranks); the owner of a linear keeps them, as plain parameters, for the shot. Returns the owners' sharded
    parameters, which :func:`scatter_back` puts back."""
    kept = {}
    for name, lin in linears.items():
        sharded = {k: p for k in ("weight", "bias") if isinstance(p := getattr(lin, k), DTensor)}
        whole = {k: p.full_tensor().detach() for k, p in sharded.items()}
        if owners[name] == rank and sharded:
            for k, t in whole.items():
                setattr(lin, k, nn.Parameter(t, requires_grad=False))
            kept[name] = sharded
    return kept


def scatter_back(linears: dict[str, nn.Linear], owners: dict[str, int], rank: int, kept: dict[str, dict[str, DTensor]],
                 dp) -> float:
    """Each owner's new weights into every rank's slices of them (a broadcast of the whole tensor, from which each
    rank copies its own slice), the owners' sharded parameters restored; returns the seconds taken."""
    t0 = time.perf_counter()
    for name, lin in linears.items():
        mine = owners[name] == rank
        for k in ("weight", "bias"):
            sharded = kept.get(name, {}).get(k) if mine else getattr(lin, k)
            if not isinstance(sharded, DTensor):
                continue
            local = sharded.to_local()
            whole = getattr(lin, k).detach() if mine else torch.empty(sharded.shape, dtype=local.dtype,
                                                                      device=local.device)
            if dp is not None:
                distributed.broadcast_tensors([whole], dp, src=owners[name])
            with torch.no_grad():
                local.copy_(_local_slice(whole, sharded))
            if mine:
                setattr(lin, k, sharded)
    return time.perf_counter() - t0


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, length)`` of ``rank``'s rows when ``rows`` are split as FSDP2 splits a dimension (``torch.chunk``:
    ceil(rows / world) each, the last ranks possibly with fewer or none)."""
    per = -(-rows // world)
    start = min(rank * per, rows)
    return start, min(per, rows - start)


def local_part(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: its slice of an FSDP-sharded one, else the whole tensor."""
    return p.to_local() if isinstance(p, DTensor) else p


def _local_slice(whole: torch.Tensor, sharded: DTensor) -> torch.Tensor:
    """This rank's part of ``whole`` under ``sharded``'s placement (FSDP: ``torch.chunk`` along one dimension)."""
    (placement,) = sharded.placements
    if not placement.is_shard():
        return whole
    mesh = sharded.device_mesh
    start, n = shard_rows(whole.shape[placement.dim], mesh.size(), mesh.get_local_rank())
    part = whole.narrow(placement.dim, start, n)
    if part.shape != sharded.to_local().shape:
        raise ValueError(f"unexpected shard layout: {tuple(part.shape)} vs {tuple(sharded.to_local().shape)}")
    return part


@dataclass
class Placement:
    """Which rank solves each linear, this rank, the compute device, and where inverses wait between the phases."""

    owners: dict[str, int]
    rank: int
    device: torch.device
    park: torch.device | str | None

    @classmethod
    def plan(cls, linears: dict[str, nn.Linear], adapter: ArchitectureAdapter, dp, opts, device: torch.device,
             factors: KFACFactors | None) -> "Placement":
        own, rank = owners(linears, adapter, dp), dp.rank if dp else 0
        return cls(own, rank, device, park_device(linears, own, rank, opts.spec, opts, device, factors))

    def mine(self, layers: list[LayerProblem]) -> list[int]:
        """Positions of the layers this rank solves."""
        return [i for i, layer in enumerate(layers) if self.owners[layer.name] == self.rank]

    def fetch(self, layer: LayerProblem, moved: dict) -> None:
        """Bring a layer's parked working weight and inverses back to the compute device for its update."""
        if self.park is not None:
            move_layer(layer, self.device, moved)
        restore_working_weight(layer, self.device)
