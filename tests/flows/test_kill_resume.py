"""Kill -9 `surgeon prune` (the Prefect flow, in its own process group) in the middle of a shot, rerun it, and check
that the completed shots come from the cache, only the interrupted shot is recomputed, nothing half-written is
left, and the final weights are bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgeon.config import load_recipe
from surgeon.outputs import lock_path
from surgeon.runner import run
from tiny_io import SURGEON_COMMAND, TEXT, save_tiny, surgeon

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "SURGEON_CACHE": str(tmp / "cache"), "SURGEON_HOME": str(tmp / "home"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    return env


class Run:
    """``surgeon prune`` in a new session (its temporary Prefect server too), its output lines collected."""

    def __init__(self, args: list, env: dict, cwd: Path):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*SURGEON_COMMAND, *map(str, args)], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, *needles: str, timeout: float = 120) -> bool:
        """True once lines containing each needle appeared in this order."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            i = 0
            for line in list(self.lines):
                if needles[i] in line:
                    i += 1
                    if i == len(needles):
                        return True
            time.sleep(0.01)
        return False

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.reader.join(timeout=10)
            self.kill_group()  # anything left in the group (a temporary server) goes too


def _complete_shots(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / "pipeline" / "shots").glob("*/state.json"))


def test_kill_9_mid_shot_then_resume_loses_at_most_that_shot(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out, js = tmp_path / "pruned", tmp_path / "result.json"
    recipe = {"model": str(model), "calibration": str(text), "nsamples": 64, "seqlen": 32, "shots": 3,
              "target_size": 0.7, "threads": 1, "register_model": False}
    args = ["prune", *[f"{k}={v}" for k, v in recipe.items() if k != "register_model"], "--no-register",
            "--output", out, "--json", js]
    env = _env(tmp_path)

    first = Run(args, env, tmp_path)
    try:
        mid_shot = first.wait_for("shot 3/3 of", "curvature")  # shots 1-2 done, shot 3 computing its curvature
        assert mid_shot, "".join(first.lines[-40:])
        first.kill_group()
    finally:
        first.finish(timeout=30)
    assert first.proc.returncode == -signal.SIGKILL
    done = _complete_shots(tmp_path / "cache")
    assert len(done) == 2, "".join(first.lines[-40:])  # shot 3 never reached its checkpoint
    stamps = {p: (p / "state.json").stat().st_mtime_ns for p in done}
    assert not out.exists() and not js.exists()  # nothing half-written
    assert lock_path(out).exists()  # a stale lock, taken over below

    second = Run(args, env, tmp_path)
    assert second.finish() == 0, "".join(second.lines[-60:])
    result = json.loads(js.read_text())
    assert result["cached_shots"] == [1, 2]  # completed shots not redone
    assert [r["cached"] for r in result["shots"]] == [True, True, False]  # only the interrupted shot recomputed
    assert {p: (p / "state.json").stat().st_mtime_ns for p in done} == stamps
    assert len(_complete_shots(tmp_path / "cache")) == 3 and not lock_path(out).exists()

    # an uninterrupted run of the same recipe (in process, no Prefect, no cache): bit-identical weights
    run(load_recipe(None, [], **recipe, output=str(tmp_path / "uninterrupted")))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "uninterrupted" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert surgeon("verify", out) == 0
