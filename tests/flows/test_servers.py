"""Real services: `prefect server`, `mlflow server` (SQLite) and a process worker on free loopback ports, started by
deployments/start_services.sh; the tiny-test deployment runs through the worker; the registered version is checked
through MLflow's REST API and in the MLflow UI with headless Chromium. Everything is stopped (process groups) even
when a step fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.servers


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(SURGEON_HOME=str(tmp / "home"), SURGEON_SERVICES_WAIT_S="240", SURGEON_RUN_TIMEOUT_S="420",
               SURGEON_VENV=str(Path(sys.executable).parent.parent))
    return env


def _read(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(missing)"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("services")
    run_dir, env = tmp / "run", _env(tmp)
    model = tmp / "tiny"
    subprocess.run([sys.executable, ROOT / "deployments" / "make_tiny_model.py", model], check=True, env=env,
                   capture_output=True)
    t0 = time.perf_counter()
    try:
        start = subprocess.run([ROOT / "deployments" / "start_services.sh", run_dir], env=env, capture_output=True,
                               text=True, timeout=600)
        assert start.returncode == 0, f"start_services failed:\n{start.stdout}\n{start.stderr}"
        started = time.perf_counter() - t0
        text = model / "text.txt"
        run = subprocess.run([ROOT / "deployments" / "run_deployment.sh", "tiny-test", f"model={model}",
                              f"calibration.data={text}", f"eval.data={text}", f"output.path={tmp / 'pruned'}"],
                             env={**env, "SURGEON_RUN_DIR": str(run_dir)}, capture_output=True, text=True,
                             timeout=480)
        assert run.returncode == 0, (f"deployment run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n"
                                     f"worker log:\n{_read(run_dir / 'worker.log')}")
        mlflow_url = re.search(r'MLFLOW_TRACKING_URI="([^"]+)"', (run_dir / "env.sh").read_text()).group(1)
        yield {"mlflow": mlflow_url, "output": tmp / "pruned", "tmp": tmp, "run": run, "env": env, "run_dir": run_dir,
               "seconds": {"start": started, "total": time.perf_counter() - t0}}
    finally:
        stop = subprocess.run([ROOT / "deployments" / "stop_services.sh", run_dir], env=env, capture_output=True,
                              text=True, timeout=120)
        print(stop.stdout, stop.stderr)
        leftover = [p for p in run_dir.glob("*.pid")]
        assert not leftover, f"processes not stopped: {leftover}"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_deployment_registers_a_version_visible_through_rest(services):
    base = services["mlflow"]
    model = _get(f"{base}/api/2.0/mlflow/registered-models/get?name=tiny-test")["registered_model"]
    versions = model["latest_versions"]
    assert versions and versions[0]["status"] == "READY"
    mv = _get(f"{base}/api/2.0/mlflow/model-versions/get?name=tiny-test&version={versions[0]['version']}")
    tags = {t["key"]: t["value"] for t in mv["model_version"]["tags"]}
    assert tags["method"] == "llm-surgeon" and tags["structure"] == "structured" and float(tags["pruned_ppl"]) > 1
    run = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={mv['model_version']['run_id']}")["run"]
    assert run["info"]["status"] == "FINISHED"
    assert (services["output"] / "recipe.yaml").is_file()  # the worker ran in the repo and wrote where it was told


def test_mlflow_ui_shows_the_model_version_in_chromium(services):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian chromium not installed (apt-get install chromium; .ci/run installs it)")
    url = f"{services['mlflow']}/#/models/tiny-test/versions/1"
    # the MLflow UI is a JS single-page app: give it virtual time to fetch and render before dumping the DOM
    profile = services["tmp"] / "chromium-profile"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "tiny-test" in dom, dom[-2000:]
    assert "Version 1" in dom, dom[-2000:]


def test_deploy_run_ends_with_a_summary(services):
    out = services["run"].stdout
    assert "Completed" in out and "| shot |" in out and "registered as `tiny-test` version 1" in out
    assert "Prefect: http://127.0.0.1:" in out and "/runs/flow-run/" in out
    assert "Finished in state" not in out  # no raw event dump


def test_promote_deployment_and_cli_on_the_running_services(services):
    """The promote deployment as its header says (version=1 is a number), its verdict in the summary; the surgeon
    command finds the running services itself (services.json), no temporary server."""
    env = {**services["env"], "SURGEON_RUN_DIR": str(services["run_dir"])}
    run = subprocess.run([ROOT / "deployments" / "run_deployment.sh", "promote/promote", "model_name=tiny-test",
                          "version=1", "max_ppl_ratio=1000"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "**passed**" in run.stdout and "Completed" in run.stdout
    refused = subprocess.run([ROOT / "deployments" / "run_deployment.sh", "promote/promote", "model_name=tiny-test",
                              "version=1", "max_ppl_ratio=0.01"], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Refused: pruned ppl" in refused.stdout, refused.stdout[-3000:]
    cli = subprocess.run([Path(sys.executable).parent / "surgeon", "promote", "--model-name", "tiny-test",
                          "--version", "1", "--max-ppl-ratio", "1000"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "using the running services" in cli.stderr and "temporary server" not in cli.stderr
