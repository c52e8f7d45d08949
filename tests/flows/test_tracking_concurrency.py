"""Concurrency of tasks.tracking (docs/reliability.md): two processes registering versions of one registered model
at once in one MLflow get versions 1 and 2, each version's artifacts identical to the exported folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.config import load_recipe
from surgeon.runner import run
from surgeon.utils import sha256_file
from tiny_io import run_inputs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A pruned, exported tiny Llama (the same run as tests/surgeon/test_reliability.py's)."""
    root = tmp_path_factory.mktemp("tracking")
    inputs = run_inputs(root)
    model, text = inputs["model"], inputs["text"]
    out = root / "pruned"
    run(load_recipe(None, [], model=str(model), calibration=str(text), nsamples=4, seqlen=16, shots=2,
                    target_size=0.8, threads=1, register_model=False, output=str(out), eval_data=str(text),
                    eval_max_windows=2))
    return out


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p, use_cache=False)
            for p in sorted(folder.rglob("*")) if p.is_file()}


_REGISTER = """
import os, sys, time
from pathlib import Path
from tasks import tracking
go, model_dir, tag = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
import mlflow  # imports done before the start line (the database is created meanwhile by the test)
tracking._provenance()  # (imports torch and transformers)
while not go.exists():
    time.sleep(0.01)
with tracking.start_run(f"concurrent {tag}", experiment="concurrency") as run:
    version = tracking.register_model(run.run_id, model_dir, "shared-model", {"writer": tag})
print(run.run_id, version)
"""


def test_two_processes_register_to_one_model_at_once(pruned, tmp_path, monkeypatch):
    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _REGISTER, str(go), str(pruned), tag], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    # meanwhile the database and experiment are created (as by any earlier run): the race is on the registry
    tracking._experiment_id(tracking._client(), "concurrency")
    go.write_text("go")  # both writers start together once their imports are done
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    runs = dict(line.split() for line, _ in results)

    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    versions = client.search_model_versions("name='shared-model'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"] and sorted(runs.values()) == ["1", "2"]
    expected = folder_hashes(pruned)
    for v in versions:
        assert runs[v.run_id] == str(v.version) and v.tags["writer"] in ("a", "b")
        local = Path(client.download_artifacts(v.run_id, "model", str(tmp_path / f"dl-{v.version}")))
        assert folder_hashes(local) == expected  # each version intact, every file identical to the export
