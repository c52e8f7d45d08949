"""Concurrency of tasks.tracking (docs/reliability.md): two processes registering the same weights to one registered
model at once in one MLflow end with one version (registration is keyed by the weights' hash): both runs name it,
the other run is linked to it, and its weights are the exported folder's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.config import load_recipe
from surgeon.runner import run
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
print(run.run_id, version["version"])
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
    from safetensors.torch import load_file

    client = MlflowClient(uri, uri)
    versions = client.search_model_versions("name='shared-model'")
    assert len(versions) == 1, [v.version for v in versions]
    (v,) = versions
    assert set(runs.values()) == {str(v.version)} and v.run_id in runs and v.tags["writer"] in ("a", "b")
    other = next(r for r in runs if r != v.run_id)
    assert v.tags["linked_run_ids"].split(",") == [other]
    assert v.tags["weights_sha256"] == tracking.weights_hash(pruned)
    local = Path(client.download_artifacts(v.run_id, "model", str(tmp_path / "dl")))
    registered = load_file(str(local / "model" / "model.safetensors"))
    exported = load_file(str(pruned / "model.safetensors"))
    assert registered.keys() == exported.keys() and all(registered[k].equal(exported[k]) for k in exported)
