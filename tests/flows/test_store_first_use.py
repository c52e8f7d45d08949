"""Concurrent first use of an MLflow SQLite store: two runs that start at the same moment on a store that does not
exist yet both succeed, and the store they leave is complete (a third run uses it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.flows, pytest.mark.heavy]
ROOT = Path(__file__).resolve().parents[2]

_RUN = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
from tasks import tracking  # imports done before the start signal: both reach the store together
import mlflow  # noqa: F401
while not go.exists():
    time.sleep(0.01)
with tracking.start_run(sys.argv[2], experiment="first-use", params={"who": sys.argv[2]}) as run:
    pass
print(run.run_id)
"""


def test_two_runs_creating_one_sqlite_store_at_once_both_succeed(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "SURGEON_HOME": str(tmp_path / "home")}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, str(go), name], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    time.sleep(20)  # both have imported mlflow and wait for the signal
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    ids = [out.strip().splitlines()[-1] for out, _ in results]
    assert len(set(ids)) == 2
    third = subprocess.run([sys.executable, "-c", _RUN, str(go), "c"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]


def test_default_registered_name_of_a_folder_with_a_colon_is_valid_for_mlflow():
    """The registry name taken from the source folder never holds the characters MLflow refuses ('/' and ':'),
    so registration cannot fail after the output is written."""
    from mlflow.utils.validation import _validate_model_name

    from tasks.tracking import registered_name

    for ref in ("/models/team:a", "/models/run:2/", "/m/llama:7b.gguf", "random:llama-2-7b"):
        name = registered_name(ref)
        _validate_model_name(name)
        assert name and ":" not in name and "/" not in name


@pytest.mark.parametrize("text, message", [
    ("model: m\nsweep: [unclosed\n", "malformed recipe YAML"),
    ("model: m\nsweep: 5\n", "needs 'sweep:'"),
    ("model: m\nsweep:\n  - 0.5\n", "needs 'sweep:'"),
    ("model: m\nsweep:\n  - {target_size: 2}\n", "sweep[0]: invalid recipe value"),
    ("- a\n- b\n", "must be a mapping"),
], ids=["syntax", "sweep-not-a-list", "variant-not-a-mapping", "bad-variant-value", "not-a-mapping"])
def test_malformed_sweep_yaml_is_one_clear_error(tmp_path, text, message):
    from flows.sweep import sweep_configs
    from surgeon.errors import SurgeonError

    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SurgeonError, match=message.replace("[", r"\[")):
        sweep_configs(str(path))


def test_unreachable_tracking_server_is_a_quick_clear_error(tmp_path):
    """A tracking URI whose server does not answer fails at once with one line, not after minutes of retries."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from tasks import tracking\n"
            "from surgeon.errors import SurgeonError\n"
            "try:\n"
            "    with tracking.start_run('x', experiment='e'):\n"
            "        pass\n"
            "except SurgeonError as exc:\n"
            "    print('error:', exc)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("error: MLflow tracking server"), proc.stdout + proc.stderr[-2000:]
    assert "unreachable" in proc.stdout and time.time() - t0 < 60
