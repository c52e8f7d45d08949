"""Data-parallel curvature over processes (torch.distributed: NCCL on GPUs, gloo on CPUs).

Each rank runs the forward+backward passes over its own contiguous share of the calibration windows; the K-FAC
*sums* (A, G) and the token counts are then all-reduced (SUM) before the division by the token count, so every
rank holds the same factors as one process over all windows (up to fp32 rounding of the summation order). With
sharded factors each sum is reduced onto the rank that solves its decoder layer instead, and only that rank keeps
it.

The per-layer solves of a shot (damped inverses, removal costs) and its OBS updates are spread over the ranks by
decoder layer (surgeon_core.shot): each layer's owner broadcasts its costs, every rank applies the same global
threshold to the same costs, and each owner then broadcasts the layer's new weights, so the ranks can never drift
apart. The weight broadcast moves one copy of the prunable weights; the costs one float per row and column (an
element cost per weight for unstructured and N:M). Coupled structures are solved on rank 0 alone, which broadcasts
all prunable weights.

Nothing here starts processes: the caller initialises the process group (``torchrun`` +
``torch.distributed.init_process_group``) and, on GPUs, sets each rank's device first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DataParallel", "resolve", "share", "all_reduce_", "all_reduce_sums", "reduce_sums", "broadcast_tensors",
           "broadcast_object"]


@dataclass(frozen=True)
class DataParallel:
    """The process group a computation is spread over (``group`` None: the default group)."""

    group: object | None
    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve(process_group=None) -> DataParallel | None:
    """``process_group``, else the default group when torch.distributed is initialised; None for one process."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("a process_group was given but torch.distributed is not initialised")
        return None
    world = dist.get_world_size(process_group)
    if world == 1:
        return None
    return DataParallel(process_group, dist.get_rank(process_group), world, str(dist.get_backend(process_group)))


def share(n: int, rank: int, world_size: int) -> slice:
    """The contiguous, balanced share of ``n`` items of ``rank`` (the first ``n % world_size`` ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _on_backend_device(t: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    """``t`` itself, or a CUDA copy when NCCL is asked to reduce a CPU tensor (factors offloaded to the CPU)."""
    if "nccl" in dp.backend and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_reduce_(t: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    """In-place SUM all-reduce of ``t`` over the group (through a device copy where the backend needs one)."""
    work = _on_backend_device(t, dp)
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=dp.group)
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_sums(sums: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], dp: DataParallel, *,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """All-reduce a dict of running sums whose keys may be missing on some ranks (a rank without windows, or a
    linear whose output never received a gradient). ``shapes`` lists every possible key, in the same order on
    every rank; a key present on no rank stays absent, a key missing on this rank starts from zeros."""
    keys = list(shapes)
    out = {}
    for key, flag in zip(keys, _present(sums, keys, dp, device)):
        if not flag:
            continue
        t = sums.get(key)
        if t is None:
            t = torch.zeros(shapes[key], dtype=torch.float32, device=device)
        out[key] = all_reduce_(t, dp)
    return out


def _present(sums: dict[str, torch.Tensor], keys: list[str], dp: DataParallel, device: torch.device) -> list[bool]:
    """Whether each key is present on any rank."""
    present = torch.tensor([float(k in sums) for k in keys], dtype=torch.float32, device=device)
    all_reduce_(present, dp)
    return [flag > 0 for flag in present.tolist()]


def reduce_sums(sums: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], dp: DataParallel, *,
                device: torch.device, owners: dict[str, int]) -> dict[str, torch.Tensor]:
    """:func:`all_reduce_sums` onto each key's owner alone (``owners``: key -> rank): a rank returns the summed
    tensors of the keys it owns and frees the others."""
    keys = list(shapes)
    out = {}
    for key, flag in zip(keys, _present(sums, keys, dp, device)):
        t = sums.pop(key, None)
        if not flag:
            continue
        if t is None:
            t = torch.zeros(shapes[key], dtype=torch.float32, device=device)
        work = _on_backend_device(t, dp)
        dist.reduce(work, dst=_global(owners[key], dp), op=dist.ReduceOp.SUM, group=dp.group)
        if dp.rank == owners[key]:
            if work is not t:
                t.copy_(work)
            out[key] = t
        del t, work
    return out


def _global(src: int, dp: DataParallel) -> int:
    return src if dp.group is None else dist.get_global_rank(dp.group, src)


def broadcast_tensors(tensors: list[torch.Tensor], dp: DataParallel, src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place; same list order on all ranks)."""
    for t in tensors:
        work = _on_backend_device(t, dp)
        dist.broadcast(work, src=_global(src, dp), group=dp.group)
        if work is not t:
            t.copy_(work)


def broadcast_object(obj, dp: DataParallel, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (small metadata such as a shot report)."""
    box = [obj if dp.rank == src else None]
    dist.broadcast_object_list(box, src=_global(src, dp), group=dp.group)
    return box[0]
