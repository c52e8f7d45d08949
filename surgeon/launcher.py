"""The launcher of data-parallel shots on one machine: one pruning shot over N processes, started with torchrun.

``surgeon prune ... nproc=N`` (recipe key ``compute.nproc``) makes every shot of the prune flow run as
``torchrun --standalone --nproc-per-node N -m surgeon.shot_worker ...``: each process loads the shot's source
checkpoint, takes 1/N of the calibration windows, and the K-FAC sums are all-reduced (surgeon_core.distributed);
the per-layer solves (costs) and updates are spread over the ranks by decoder layer, every rank applies the same
global threshold, the new weights are broadcast, and rank 0 writes the checkpoint.
Backend: NCCL with one GPU per process (``cuda:LOCAL_RANK``) for a CUDA recipe, gloo on the CPU.

The worker is also a plain torchrun entry point, so a shot of the flow can be run by hand (e.g. to profile it)::

    torchrun --standalone --nproc-per-node 2 -m surgeon.shot_worker --recipe RECIPE.yaml \\
        --source MODEL_OR_PREVIOUS_SHOT_DIR --calibration WINDOWS.npy --shot 1 --output CHECKPOINT_DIR
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from surgeon_core.schedule import Step

from .config import PruneConfig
from .errors import SurgeonError

__all__ = ["check_nproc", "launch_shot", "PROGRESS"]

PROGRESS = "@@surgeon-progress"  # prefix of rank 0's progress lines on stdout
_EXCEPTION = re.compile(r"^(\[rank\d+\]:\s*)?([\w.]+\.)?\w*(Error|Exception)\b.*:")


def check_nproc(cfg: PruneConfig) -> None:
    """One-line errors for an ``nproc`` this machine cannot run (before any work starts)."""
    n = cfg.compute.nproc
    if n <= 1:
        return
    if cfg.compute.device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > count:
            raise SurgeonError(f"compute.nproc={n} needs {n} GPUs (one per process) but {count} are visible "
                               "(see CUDA_VISIBLE_DEVICES)")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if n > cores:
            raise SurgeonError(f"compute.nproc={n} exceeds the {cores} CPU cores available to this process")


def _env(cfg: PruneConfig) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; share the cores instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(cfg.compute.threads or max(1, cores // cfg.compute.nproc))
    return env


def _torchrun(cfg: PruneConfig, worker_args: list[str], progress=None) -> tuple[int, list[str]]:
    """Run ``surgeon.shot_worker worker_args`` over ``cfg.compute.nproc`` processes; (exit code, last output lines).
    Rank 0's progress lines go to ``progress(phase, done, total)``, the workers' other output to stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.compute.nproc}",
           "-m", "surgeon.shot_worker", *worker_args]
    tail: collections.deque[str] = collections.deque(maxlen=300)
    with subprocess.Popen(cmd, env=_env(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                _, phase, done, total = line.split()
                if progress is not None:
                    progress(phase, int(done), int(total))
                continue
            tail.append(line.rstrip())
            sys.stderr.write(line)
        rc = proc.wait()
    return rc, list(tail)


def _failure(what: str, cfg: PruneConfig, rc: int, tail: list[str]) -> SurgeonError:
    # the worker's own exception line, not torchrun's ChildFailedError summary
    errors = [t for t in tail if _EXCEPTION.match(t) and "ChildFailedError" not in t] or tail
    return SurgeonError(f"{what} over {cfg.compute.nproc} processes failed (exit {rc}): "
                        f"{errors[-1] if errors else 'no output'}")


def launch_shot(cfg: PruneConfig, source_dir: str, calib_path: str, step: Step, ckpt_dir: str,
                progress=None) -> dict:
    """Run ``step`` over ``cfg.compute.nproc`` processes (torchrun) and return its report (``state.json``).

    Progress lines of rank 0 are passed to ``progress(phase, done, total)``; the workers' other output goes to
    stderr. A failed worker stops the others (torchrun) and raises one SurgeonError with the end of its output.
    """
    check_nproc(cfg)
    with tempfile.TemporaryDirectory(prefix="surgeon-dp-") as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(cfg.to_yaml(), encoding="utf-8")
        rc, tail = _torchrun(cfg, ["--recipe", str(recipe), "--source", str(source_dir), "--calibration",
                                   str(calib_path), "--shot", str(step.shot), "--output", str(ckpt_dir)], progress)
    state = Path(ckpt_dir) / "state.json"
    if rc != 0 or not state.is_file():
        raise _failure(f"data-parallel shot {step.shot}", cfg, rc, tail)
    return json.loads(state.read_text())["report"]


def launch_eval(cfg: PruneConfig, model_dir: str, eval_path: str, progress=None) -> dict:
    """Perplexity of ``model_dir`` over the windows in ``eval_path``, its weights sharded over ``cfg.compute.nproc``
    processes (FSDP2, each reading only its slices) and the windows shared among them; returns
    :func:`surgeon_core.evaluate.perplexity`'s result."""
    check_nproc(cfg)
    with tempfile.TemporaryDirectory(prefix="surgeon-dp-") as tmp:
        recipe, result = Path(tmp) / "recipe.yaml", Path(tmp) / "result.json"
        recipe.write_text(cfg.to_yaml(), encoding="utf-8")
        rc, tail = _torchrun(cfg, ["--recipe", str(recipe), "--source", str(model_dir), "--evaluate",
                                   str(eval_path), "--result", str(result)], progress)
        if rc != 0 or not result.is_file():
            raise _failure("sharded evaluation", cfg, rc, tail)
        return json.loads(result.read_text())
