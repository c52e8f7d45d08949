"""Fixtures of the flows lane: one Prefect test harness and one MLflow (temporary SQLite) for the session, the tiny
recipe the flows run, and a first prune flow run that registers a version (shared by test_flows and test_flows_cli)."""

from __future__ import annotations

import os

import pytest

from tiny_io import TEXT, save_tiny


@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory):
    """Prefect (test harness, temp home), MLflow (temp SQLite) and SURGEON_HOME, all under one temp folder.

    Prefect reads its settings when first imported, so the environment is set before any prefect import.
    """
    root = tmp_path_factory.mktemp("pipeline")
    env = {"PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "SURGEON_HOME": str(root / "home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_recipe(pipeline_env) -> dict:
    """Flat names (each a config field's unique name or its section_field name), so tests override single keys."""
    model = save_tiny(pipeline_env / "tiny-llama")
    text = pipeline_env / "text.txt"
    text.write_text(TEXT)
    return {"model": str(model), "model_name": "tiny-llama", "calibration": str(text), "nsamples": 4, "seqlen": 16,
            "shots": 2, "target_size": 0.7, "eval_data": str(text), "eval_seqlen": 16, "eval_max_windows": 4,
            "threads": 1, "experiment": "tests"}


@pytest.fixture(scope="session")
def first_run(tiny_recipe, tmp_path_factory):
    from flows.prune import prune_flow

    out = tmp_path_factory.mktemp("first") / "pruned"
    return prune_flow({**tiny_recipe, "output": str(out), "eval_at": [0.85]})
