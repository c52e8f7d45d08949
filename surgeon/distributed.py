"""Data-parallel shots on one machine: one pruning shot over N processes, launched with torchrun.

``surgeon prune ... --nproc N`` (recipe key ``nproc``) makes every shot of the prune flow run as
``torchrun --standalone --nproc-per-node N -m surgeon.distributed ...``: each process loads the shot's source
checkpoint, takes 1/N of the calibration windows, and the K-FAC sums are all-reduced (surgeon_core.distributed);
the per-layer solves (costs) and updates are spread over the ranks by decoder layer, every rank applies the same
global threshold, the new weights are broadcast, and rank 0 writes the checkpoint.
Backend: NCCL with one GPU per process (``cuda:LOCAL_RANK``) for a CUDA recipe, gloo on the CPU.

The worker is also a plain torchrun entry point, so a shot of the flow can be run by hand (e.g. to profile it)::

    torchrun --standalone --nproc-per-node 2 -m surgeon.distributed --recipe RECIPE.yaml \\
        --source MODEL_OR_PREVIOUS_SHOT_DIR --calibration WINDOWS.npy --shot 1 --output CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import PruneConfig
from .errors import SurgeonError

__all__ = ["check_nproc", "launch_shot", "main"]

_PROGRESS = "@@surgeon-progress"
_EXCEPTION = re.compile(r"^(\[rank\d+\]:\s*)?([\w.]+\.)?\w*(Error|Exception)\b.*:")


def check_nproc(cfg: PruneConfig) -> None:
    """One-line errors for an ``nproc`` this machine cannot run (before any work starts)."""
    n = cfg.nproc
    if n <= 1:
        return
    if cfg.device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > count:
            raise SurgeonError(f"--nproc {n} needs {n} GPUs (one per process) but {count} are visible "
                               "(see CUDA_VISIBLE_DEVICES)")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if n > cores:
            raise SurgeonError(f"--nproc {n} exceeds the {cores} CPU cores available to this process")


def _env(cfg: PruneConfig) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; share the cores instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(cfg.threads or max(1, cores // cfg.nproc))
    return env


def launch_shot(cfg: PruneConfig, source_dir: str, calib_path: str, shot: int, ckpt_dir: str,
                progress=None) -> dict:
    """Run shot ``shot`` over ``cfg.nproc`` processes (torchrun) and return its report (``state.json``).

    Progress lines of rank 0 are passed to ``progress(phase, done, total)``; the workers' other output goes to
    stderr. A failed worker stops the others (torchrun) and raises one SurgeonError with the end of its output.
    """
    check_nproc(cfg)
    with tempfile.TemporaryDirectory(prefix="surgeon-dp-") as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(cfg.to_yaml(), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
               "-m", "surgeon.distributed", "--recipe", str(recipe), "--source", str(source_dir),
               "--calibration", str(calib_path), "--shot", str(shot), "--output", str(ckpt_dir)]
        tail: collections.deque[str] = collections.deque(maxlen=300)
        with subprocess.Popen(cmd, env=_env(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as proc:
            for line in proc.stdout:
                if line.startswith(_PROGRESS):
                    _, phase, done, total = line.split()
                    if progress is not None:
                        progress(phase, int(done), int(total))
                    continue
                tail.append(line.rstrip())
                sys.stderr.write(line)
            rc = proc.wait()
    state = Path(ckpt_dir) / "state.json"
    if rc != 0 or not state.is_file():
        # the worker's own exception line, not torchrun's ChildFailedError summary
        errors = [t for t in tail if _EXCEPTION.match(t) and "ChildFailedError" not in t] or list(tail)
        raise SurgeonError(f"data-parallel shot {shot} over {cfg.nproc} processes failed (exit {rc}): "
                           f"{errors[-1] if errors else 'no output'}")
    return json.loads(state.read_text())["report"]


def _progress_lines(phase: str, done: int, total: int) -> None:
    print(f"{_PROGRESS} {phase} {done} {total}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """torchrun worker: one rank of a data-parallel shot (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m surgeon.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (the prune flow writes the resolved config)")
    p.add_argument("--source", required=True, help="model folder or the previous shot's checkpoint")
    p.add_argument("--calibration", required=True, help=".npy calibration windows (n, L)")
    p.add_argument("--shot", type=int, required=True, help="1-based shot of the recipe's schedule")
    p.add_argument("--output", required=True, help="checkpoint folder to write (rank 0)")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from .config import load_recipe
    from .pruning import run_shot

    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("surgeon.distributed runs under torchrun (LOCAL_RANK is not set)")
    cfg = load_recipe(args.recipe)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        cfg = cfg.model_copy(update={"device": f"cuda:{local_rank}"})
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        progress = _progress_lines if dist.get_rank() == 0 else None
        run_shot(cfg, args.source, args.calibration, args.shot, args.output, progress=progress)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
