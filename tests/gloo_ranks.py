"""Run a function in each process of a gloo group on the CPU and collect what each returned (tests of data-parallel
and sharded code against one process)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _worker(rank: int, store: str, out_dir: str, world: int, fn) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(fn(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp: Path, world: int = 2) -> list:
    """``fn()`` (a module-level function: it is pickled by name) in each of ``world`` spawned processes of one gloo
    group (file rendezvous in ``tmp``); the results in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp), world, fn), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
