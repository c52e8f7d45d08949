"""`surgeon report`: the structure report of a pruned folder, the same report from its kept units alone (how a GPU
machine without the run's weights measures the run's structure), and attaching such a report to the MLflow run
after checking that it timed the run's structure."""

import json

import pytest
import torch

from surgeon.models import save_model
from surgeon_cli.main import main
from tiny_io import tiny_tokenizer
from tiny_models import coupled_pruned, tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    save_model(tiny_model("llama", seed=0), tiny_tokenizer(), root / "dense")
    save_model(coupled_pruned("llama", seed=0), tiny_tokenizer(), root / "pruned")
    return root


def _run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def reports(folders):
    """The report from the pruned folder (also writing its kept units), and the one from the kept units alone."""
    r = folders
    assert main(["report", str(r / "pruned"), "--dense", str(r / "dense"), "--save-kept", str(r / "kept.json"),
                 "--threads", "1", "--json", str(r / "own.json")]) == 0
    assert main(["report", "--kept", str(r / "kept.json"), "--dense", str(r / "dense"), "--threads", "1",
                 "--json", str(r / "from_kept.json")]) == 0
    return json.loads((r / "own.json").read_text()), json.loads((r / "from_kept.json").read_text())


def test_kept_units_give_the_pruned_models_structure(reports):
    own, from_kept = reports
    assert own["layers"] == from_kept["layers"]
    assert own["parameters"] == from_kept["parameters"]
    assert own["parameters"]["materialized_total"] < own["parameters"]["dense_total"]
    assert own["file_bytes"]["materialized"] == from_kept["file_bytes"]["materialized"]
    assert "zeroed" in own["file_bytes"] and "zeroed" not in from_kept["file_bytes"]
    assert own["source"]["weights"] == "the pruned model's own"
    assert from_kept["source"]["kept_units"] is True
    for work in ("prefill", "decode"):
        assert own["speed"][f"{work}_speedup"] > 0 and from_kept["speed"][f"{work}_speedup"] > 0


def test_attach_checks_the_structure_and_logs_beside_the_cpu_report(folders, reports, capsys):
    from mlflow import MlflowClient

    from tasks import tracking

    own, from_kept = reports
    with tracking.start_run("report-test", experiment="report-test") as run:
        tracking.log_structure_report(run.run_id, own)
    gpu = json.loads(json.dumps(from_kept))
    gpu["speed"]["device_name"] = "a GPU"  # what a report timed on a GPU carries; attach files it separately
    (folders / "gpu.json").write_text(json.dumps(gpu))
    rc, out, err = _run(["report", "--attach", str(folders / "gpu.json"), "--run-id", run.run_id], capsys)
    assert rc == 0, err
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    data = client.get_run(run.run_id).data
    assert data.metrics["structure_gpu/params_materialized"] == own["parameters"]["materialized_total"]
    assert data.metrics["structure/params_materialized"] == own["parameters"]["materialized_total"]
    assert data.tags["structure_gpu/device"] == "a GPU" and data.tags["structure/device"] == "cpu"
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"structure_report.json", "structure_report_gpu.json"} <= names

    other = json.loads(json.dumps(gpu))
    other["layers"][0] = {**other["layers"][0], "intermediate_size": other["layers"][0]["intermediate_size"] + 8}
    (folders / "other.json").write_text(json.dumps(other))
    rc, _, err = _run(["report", "--attach", str(folders / "other.json"), "--run-id", run.run_id], capsys)
    assert rc == 2 and "different structure" in err and "layers differ at [0]" in err

    with tracking.start_run("no-report", experiment="report-test") as bare:
        pass
    rc, _, err = _run(["report", "--attach", str(folders / "gpu.json"), "--run-id", bare.run_id], capsys)
    assert rc == 2 and "no structure_report.json" in err


def test_report_rejects_bad_input(folders, capsys):
    r = folders
    assert _run(["report", "--dense", str(r / "dense")], capsys)[0] == 2  # neither folder nor --kept
    assert _run(["report", str(r / "pruned"), "--kept", str(r / "kept.json"), "--dense", str(r / "dense")],
                capsys)[0] == 2
    rc, _, err = _run(["report", str(r / "nowhere"), "--dense", str(r / "dense")], capsys)
    assert rc == 2 and "not found" in err
    rc, _, err = _run(["report", str(r / "pruned"), "--dense", str(r / "dense"), "--device", "cuda"], capsys)
    assert rc == 2 and ("no GPU" in err or torch.cuda.is_available())
    rc, _, err = _run(["report", "--attach", str(r / "missing.json"), "--run-id", "x"], capsys)
    assert rc == 2 and "not found" in err
