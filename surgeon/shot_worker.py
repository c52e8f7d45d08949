"""torchrun worker: one rank of a data-parallel shot, or of an evaluation on sharded weights (started by
:mod:`surgeon.launcher`; runnable by hand)::

    torchrun --standalone --nproc-per-node 2 -m surgeon.shot_worker --recipe RECIPE.yaml \\
        --source MODEL_OR_PREVIOUS_SHOT_DIR --calibration WINDOWS.npy --shot 1 --output CHECKPOINT_DIR
    torchrun --standalone --nproc-per-node 2 -m surgeon.shot_worker --recipe RECIPE.yaml \\
        --source MODEL_DIR --evaluate WINDOWS.npy --result RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from .config import load_recipe
from .launcher import PROGRESS
from .runner import evaluate_dir, prune_step_dir
from .utils import atomic_write


def _progress_lines(phase: str, done: int, total: int) -> None:
    print(f"{PROGRESS} {phase} {done} {total}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m surgeon.shot_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (the launcher writes the resolved config)")
    p.add_argument("--source", required=True, help="model folder or the previous shot's checkpoint")
    p.add_argument("--calibration", help=".npy calibration windows (n, L)")
    p.add_argument("--shot", type=int, help="1-based shot of the recipe's plan")
    p.add_argument("--output", help="checkpoint folder to write (rank 0)")
    p.add_argument("--evaluate", help=".npy evaluation windows: evaluate --source instead of pruning it")
    p.add_argument("--result", help="JSON file for the evaluation's result (rank 0)")
    args = p.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("surgeon.shot_worker runs under torchrun (LOCAL_RANK is not set)")
    cfg = load_recipe(args.recipe)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.compute.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        cfg = load_recipe(args.recipe, [f"compute.device=cuda:{local_rank}"])
        backend = "nccl"
    else:
        backend = "gloo"
    if args.evaluate is not None:
        if args.result is None:
            raise SystemExit("--evaluate needs --result")
    elif None in (args.calibration, args.shot, args.output):
        raise SystemExit("a shot needs --calibration, --shot and --output")
    elif not 1 <= args.shot <= len(cfg.plan()):
        raise SystemExit(f"shot {args.shot} does not exist: the plan has {len(cfg.plan())}")
    dist.init_process_group(backend)
    try:
        progress = _progress_lines if dist.get_rank() == 0 else None
        if args.evaluate is not None:
            result = evaluate_dir(args.source, args.evaluate, cfg, progress=progress)
            if dist.get_rank() == 0:
                atomic_write(args.result, json.dumps(result))
        else:
            prune_step_dir(cfg, args.source, args.calibration, cfg.plan()[args.shot - 1], args.output,
                           progress=progress)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
