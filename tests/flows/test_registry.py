"""The registry's outputs as people use them: a registered version (zeroed or materialized) loads through MLflow's
own API and generates; the running services are used instead of a temporary Prefect server; `surgeon gc` removes
only what no registered version needs. Runs under the flows' Prefect test harness (tests/flows/conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tiny_io import surgeon

pytestmark = pytest.mark.flows

PROMPT = "The quick brown"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow


def _source_dir(name: str, version: str) -> Path:
    from mlflow import MlflowClient

    from tasks.tracking import _local_artifact_path

    uri = os.environ["MLFLOW_TRACKING_URI"]
    return _local_artifact_path(MlflowClient(uri, uri).get_model_version(name, version).source)


def test_registered_version_loads_through_mlflow_and_generates(first_run):
    from tasks import tracking

    mlflow = _mlflow()
    v = first_run["registered_version"]
    tracking.set_alias("tiny-llama", v, "loadtest")
    pipe = mlflow.transformers.load_model("models:/tiny-llama@loadtest")
    assert type(pipe.model).__name__ == "LlamaForCausalLM"
    text = pipe(PROMPT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    model = mlflow.pyfunc.load_model(f"models:/tiny-llama/{v}")
    short = model.predict([PROMPT], params={"max_new_tokens": 1, "do_sample": False})[0]
    longer = model.predict([PROMPT], params={"max_new_tokens": 6, "do_sample": False})[0]
    assert isinstance(short, str) and len(longer) > len(short)  # the params reach generate
    # the registered weights are the exported ones
    from safetensors.torch import load_file

    exported = load_file(str(Path(first_run["output"]) / "model.safetensors"))
    state = pipe.model.state_dict()
    assert all(state[k].equal(t) for k, t in exported.items() if k in state)


def test_materialized_version_loads_with_the_products_classes_not_folder_code(tiny_recipe, tmp_path):
    from flows.prune import prune_flow

    r = prune_flow({**tiny_recipe, "structure": "coupled", "shots": 1, "target_size": 0.6, "materialize": True,
                    "structure_report": False, "model_name": "tiny-materialized", "output": str(tmp_path / "c")})
    assert r["materialized"]["output"] == str(tmp_path / "c-materialized") and r["registration"] == "new"
    folder = _source_dir("tiny-materialized", r["registered_version"])
    assert not list(folder.rglob("*.py"))  # no modelling code travels with the registered version
    assert "auto_map" not in json.loads((folder / "model" / "config.json").read_text())
    pipe = _mlflow().transformers.load_model(f"models:/tiny-materialized/{r['registered_version']}")
    assert type(pipe.model).__name__ == "SurgeonPrunedLlamaForCausalLM"
    dense_params = r["materialized"]["parameters_before"]["total"]
    assert sum(p.numel() for p in pipe.model.parameters()) < dense_params
    assert pipe(PROMPT, max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith(PROMPT)


def test_cli_uses_the_recorded_running_prefect_server(pipeline_env, monkeypatch, tmp_path):
    """services.json naming a server that answers (here the test harness's) is used; a dead one is not."""
    from prefect.settings import PREFECT_API_URL

    from surgeon_cli import common

    run_dir = tmp_path / "services"
    run_dir.mkdir()
    monkeypatch.setenv("SURGEON_RUN_DIR", str(run_dir))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    (run_dir / "services.json").write_text(json.dumps({"prefect_api_url": "http://127.0.0.1:9/api",
                                                       "mlflow_tracking_uri": "http://127.0.0.1:9"}))
    assert common.running_services() is None
    common.pipeline_env()
    assert "PREFECT_API_URL" not in os.environ
    api = PREFECT_API_URL.value()
    (run_dir / "services.json").write_text(json.dumps({"prefect_api_url": api,
                                                       "mlflow_tracking_uri": "http://127.0.0.1:9"}))
    assert common.running_services()["prefect_api_url"] == api
    common.pipeline_env()
    assert os.environ["PREFECT_API_URL"] == api
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:")  # set already: kept


def test_gc_dry_run_lists_and_gc_removes_only_unreferenced(tiny_recipe, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from flows.prune import prune_flow
    from surgeon_cli.gc import collect

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    recipe = {**tiny_recipe, "shots": 1, "model_name": "gc-model", "structure_report": False}
    r1 = prune_flow({**recipe, "target_size": 0.8, "output": str(tmp_path / "a")})
    r2 = prune_flow({**recipe, "target_size": 0.6, "output": str(tmp_path / "b")})
    assert (r1["registered_version"], r2["registered_version"]) == ("1", "2")
    gone, kept = _source_dir("gc-model", "1"), _source_dir("gc-model", "2")
    MlflowClient(uri, uri).delete_model_version("gc-model", "1")
    shots = sorted((tmp_path / "cache" / "pipeline" / "shots").iterdir())
    assert len(shots) == 2

    # entries changed within --min-age are left alone (a running flow may use them)
    assert not collect(min_age_s=3600)["cache"] and not collect(min_age_s=3600)["mlflow"]
    report = tmp_path / "gc.json"
    assert surgeon("gc", "--dry-run", "--min-age", "0", "--json", report) == 0
    out = capsys.readouterr().out
    found = json.loads(report.read_text())
    assert [e["path"] for e in found["mlflow"]] == [str(gone)]
    assert {str(s) for s in shots} <= {e["path"] for e in found["cache"]}
    assert [e["path"] for e in found["kept"]] == [str(kept)]
    assert f"would remove mlflow run {r1['run_id']} model" in out and "would free" in out
    assert gone.is_dir() and all(s.exists() for s in shots)  # a dry run removes nothing

    assert surgeon("gc", "--min-age", "0") == 0
    assert "freed" in capsys.readouterr().out
    assert not gone.exists() and not any(s.exists() for s in shots)
    assert (kept / "MLmodel").is_file()
    pipe = _mlflow().transformers.load_model("models:/gc-model/2")  # the registered version still loads
    assert pipe(PROMPT, max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith(PROMPT)
    # a rerun after gc recomputes the removed shots and reuses version 2
    r3 = prune_flow({**recipe, "target_size": 0.6, "output": str(tmp_path / "b2")})
    assert r3["cached_shots"] == [] and (r3["registered_version"], r3["registration"]) == ("2", "reused")


def test_experiment_opens_in_the_model_development_view(first_run):
    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    exp = MlflowClient(uri, uri).get_experiment_by_name("tests")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
