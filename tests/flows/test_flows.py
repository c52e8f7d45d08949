"""The prune / sweep / promote flows on a tiny random model, under one Prefect test harness, MLflow in tmp SQLite.

Checks: tracking (params, per-shot metrics with steps, artifacts), registration with tags, the promotion gate
(passes and refuses), resume after a failure between shots (completed shots are not redone and the final weights
equal an uninterrupted run's), and a rerun to another output folder served from the cache. The session's harness,
tiny recipe and first run: tests/flows/conftest.py; the `surgeon prune/promote/sweep` commands on them:
tests/flows/test_flows_cli.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.flows


@pytest.fixture
def shot_calls(monkeypatch):
    """Records the shots that really run (a cache hit does not call ``prune_step_dir``); ``fail_at`` injects a
    crash."""
    from tasks import steps

    real = steps.runner.prune_step_dir
    calls = {"shots": [], "fail_at": None}

    def spy(cfg, source_dir, calib_path, step, ckpt_dir, progress=None, log=None):
        calls["shots"].append(step.shot)
        if step.shot == calls["fail_at"]:
            raise RuntimeError(f"injected failure in shot {step.shot}")
        return real(cfg, source_dir, calib_path, step, ckpt_dir, progress=progress, log=log)

    monkeypatch.setattr(steps.runner, "prune_step_dir", spy)
    return calls


def client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_prune_flow_tracks_exports_and_registers(first_run):
    r = first_run
    assert r["registered_version"] and r["shots"] == 2 and r["cached_shots"] == []
    assert abs(r["achieved_size"] - 0.7) < 0.01 and r["ppl"] > 1 and r["dense_ppl"] > 1
    assert [row["ppl"] is not None for row in r["rows"]] == [True, True]  # eval_at 0.85 -> shot 1, final shot 2
    out = r["output"]
    recipe = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    assert recipe["method"]["name"] == "llm-surgeon" and recipe["method"]["shots"] == 2
    assert os.path.isfile(os.path.join(out, "manifest.json"))

    c = client()
    run = c.get_run(r["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "llm-surgeon" and run.data.params["method.target_size"] == "0.7"
    assert run.data.params["calibration.nsamples"] == "4" and run.data.tags["config_hash"] == r["config_hash"]
    assert [m.step for m in c.get_metric_history(r["run_id"], "size")] == [0, 1, 2]
    assert [m.step for m in c.get_metric_history(r["run_id"], "ppl")] == [0, 1, 2]
    for name in ("size/q_proj", "size/down_proj", "estimated_loss", "seconds/curvature", "peak_rss_gb"):
        assert [m.step for m in c.get_metric_history(r["run_id"], name)] == [1, 2], name
    files = {f.path for f in c.list_artifacts(r["run_id"])} | {f.path for f in c.list_artifacts(r["run_id"], "plots")}
    assert {"recipe.yaml", "allocation.csv", "summary.json", "model", "plots/allocation_heatmap.png",
            "plots/ppl_vs_size.png"} <= files
    header = open(c.download_artifacts(r["run_id"], "allocation.csv")).readline().strip().split(",")
    assert header == ["layer", "block", "type", "size_shot_1", "size_shot_2"]

    mv = c.get_model_version("tiny-llama", r["registered_version"])
    assert mv.run_id == r["run_id"]
    assert {"method", "structure", "target_size", "dense_ppl", "pruned_ppl", "source_model_hash"} <= set(mv.tags)
    assert mv.tags["structure"] == "structured" and mv.tags["source_model_hash"] == r["source_model_hash"]
    assert float(mv.tags["pruned_ppl"]) == pytest.approx(r["ppl"])
    # an MLflow transformers model (MLmodel, the weights under model/, the tokenizer under components/)
    assert os.path.isfile(c.download_artifacts(r["run_id"], "model/model/model.safetensors"))
    assert "transformers" in yaml.safe_load(open(c.download_artifacts(r["run_id"], "model/MLmodel")))["flavors"]
    assert mv.tags["weights_sha256"] == r["weights_sha256"] and r["registration"] == "new"

    # the structure report of a structured output: parameters, file sizes, CPU speed of the materialized model
    rep = r["structure_report"]
    assert rep["parameters"]["materialized_total"] <= rep["parameters"]["dense_total"]
    assert rep["file_bytes"]["materialized"] <= rep["file_bytes"]["dense"]
    assert rep["speed"]["dense"]["prefill_tokens_per_s"] > 0 and rep["speed"]["pruned"]["decode_ms_per_token"] > 0
    assert c.get_metric_history(r["run_id"], "structure/params_materialized")[0].value == \
        rep["parameters"]["materialized_total"]
    assert rep["equivalence"]["same_function"]  # the materialized model was checked against the zeroed one
    assert c.get_metric_history(r["run_id"], "structure/logits_float64_max_abs_diff")[0].value == \
        rep["equivalence"]["float64_max_abs_diff"]
    assert "structure_report.json" in files


def test_coupled_flow_reports_a_really_smaller_model(tiny_recipe, tmp_path):
    """A coupled run drops whole FFN units and heads: the structure report's materialized model is strictly smaller
    (parameters and file), checked against the zeroed model, and its figures are the run's metrics."""
    from flows.prune import prune_flow

    r = prune_flow({**tiny_recipe, "structure": "coupled", "shots": 1, "target_size": 0.6,
                    "model_name": "tiny-llama-coupled", "output": str(tmp_path / "coupled")})
    rep = r["structure_report"]
    pa = rep["parameters"]
    assert pa["materialized_total"] < pa["dense_total"] and rep["file_bytes"]["materialized"] < rep["file_bytes"]["dense"]
    # FFN widths are padded back up to multiples of 64 with zero units (fast matmuls), so at most that much is kept
    assert r["achieved_size"] - 0.01 <= pa["prunable_fraction"] < 1 and rep["align"] == 64
    assert rep["equivalence"]["same_function"] and rep["equivalence"]["float64_max_abs_diff"] <= 1e-6
    c = client()
    assert c.get_metric_history(r["run_id"], "structure/params_materialized")[0].value == pa["materialized_total"]
    assert c.get_model_version("tiny-llama-coupled", r["registered_version"]).tags["structure"] == "coupled"


def test_rerun_to_another_output_reuses_cached_shots(first_run, tiny_recipe, shot_calls, tmp_path):
    from flows.prune import prune_flow

    r = prune_flow({**tiny_recipe, "output": str(tmp_path / "again"), "eval_at": [0.85]})
    assert shot_calls["shots"] == [] and r["cached_shots"] == [1, 2]
    a, b = weights(tmp_path / "again"), weights(__import__("pathlib").Path(first_run["output"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same weights: the version registered first is reused, nothing is copied, the new run is linked to it
    v = first_run["registered_version"]
    assert r["ppl"] == first_run["ppl"] and r["registered_version"] == v and r["registration"] == "reused"
    c = client()
    mv = c.get_model_version("tiny-llama", v)
    assert mv.run_id == first_run["run_id"] and r["run_id"] in mv.tags["linked_run_ids"].split(",")
    assert mv.tags["weights_sha256"] == r["weights_sha256"] == first_run["weights_sha256"]
    tags = c.get_run(r["run_id"]).data.tags
    assert (tags["registered_version"], tags["registration"]) == (v, "reused")
    assert "model" not in {f.path for f in c.list_artifacts(r["run_id"])}


def test_rerun_to_the_same_output_leaves_it_unless_it_was_altered(first_run, tiny_recipe, tmp_path):
    """An output folder that already holds the run's weights, recipe and metrics (every file as its manifest says)
    is not rewritten; one whose files were altered is written again."""
    import shutil
    from pathlib import Path

    from flows.prune import prune_flow
    from surgeon.outputs import verify_dir

    out = tmp_path / "same"
    shutil.copytree(first_run["output"], out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    recipe = {**tiny_recipe, "output": str(out), "eval_at": [0.85]}
    assert prune_flow(recipe)["output"] == str(out.resolve())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    (out / "tokenizer_config.json").write_text("{}")
    prune_flow(recipe)
    assert verify_dir(out)["ok"] and json.loads((out / "tokenizer_config.json").read_text()) != {}
    assert json.loads((out / "manifest.json").read_text())["weights_key"]
    assert Path(first_run["output"]).is_dir()


def test_resume_after_failure_between_shots(tiny_recipe, shot_calls, tmp_path, monkeypatch):
    from flows.prune import prune_flow

    recipe = {**tiny_recipe, "shots": 3, "target_size": 0.6, "register_model": False}
    shot_calls["fail_at"] = 2
    with pytest.raises(RuntimeError, match="injected failure in shot 2"):
        prune_flow({**recipe, "output": str(tmp_path / "crashed")})
    assert shot_calls["shots"] == [1, 2] and not (tmp_path / "crashed").exists()
    failed = client().search_runs([client().get_experiment_by_name("tests").experiment_id],
                                  order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert failed.info.status == "FAILED"

    shot_calls["fail_at"] = None
    resumed = prune_flow({**recipe, "output": str(tmp_path / "resumed")})
    assert shot_calls["shots"] == [1, 2, 2, 3]  # shot 1 not redone
    assert resumed["cached_shots"] == [1] and resumed["registered_version"] is None

    # the same recipe, uninterrupted, with an empty cache: identical weights
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "fresh-cache"))
    clean = prune_flow({**recipe, "output": str(tmp_path / "clean")})
    assert clean["cached_shots"] == [] and shot_calls["shots"][4:] == [1, 2, 3]
    a, b = weights(tmp_path / "resumed"), weights(tmp_path / "clean")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_flow_without_evaluation_data(tiny_recipe, tmp_path):
    """No eval.data: the plan still marks the last step for evaluation, but nothing is evaluated (no perplexity)."""
    from flows.prune import prune_flow

    recipe = {k: v for k, v in tiny_recipe.items() if not k.startswith("eval_")}
    r = prune_flow({**recipe, "shots": 1, "register_model": False, "output": str(tmp_path / "no-eval")})
    assert r["ppl"] is None and r["dense_ppl"] is None and r["ppl_ratio"] is None and r["eval_data_id"] is None
    assert [row["ppl"] for row in r["rows"]] == [None] and abs(r["achieved_size"] - 0.7) < 0.01
    assert (tmp_path / "no-eval" / "model.safetensors").is_file()


def test_promote_moves_champion_only_through_the_gate(first_run, tiny_recipe, tmp_path):
    from flows.promote import promote_flow
    from flows.prune import prune_flow
    from tasks import tracking

    v1 = first_run["registered_version"]
    ok = promote_flow("tiny-llama", v1, max_ppl_ratio=100.0)
    assert ok["passed"] and tracking.alias_version("tiny-llama") == v1
    # a stricter recipe gate (from the version's tags) refuses another version (other weights: target 0.6); the
    # alias stays, and the flow run ends in a Failed state named Refused whose message is the reason
    strict = prune_flow({**tiny_recipe, "target_size": 0.6, "output": str(tmp_path / "strict"),
                         "promote_max_ppl_ratio": 0.5})
    assert strict["registered_version"] != v1 and strict["registration"] == "new"
    state = promote_flow("tiny-llama", strict["registered_version"], return_state=True)
    assert state.is_failed() and state.name == "Refused" and state.message.startswith("Refused: pruned ppl")
    refused = state.result(raise_on_failure=False).result
    assert not refused["passed"] and refused["max_ppl_ratio"] == 0.5 and "ratio" in refused["reason"]
    assert refused["reason"] in state.message and tracking.alias_version("tiny-llama") == v1
    assert client().get_model_version("tiny-llama", strict["registered_version"]).tags["promotion_gate"] == "refused"


def test_sweep_compares_variants(tiny_recipe, tmp_path):
    from flows.sweep import sweep_flow

    recipe = {**tiny_recipe, "shots": 1, "register_model": False, "output": str(tmp_path / "sweep"),
              "sweep": [{"method": "llm-surgeon", "target_size": 0.8}, {"method": "magnitude", "target_size": 0.8}]}
    r = sweep_flow(recipe)
    assert [row["variant"] for row in r["rows"]] == ["llm-surgeon-structured-0.8", "magnitude-structured-0.8"]
    assert all(row["ppl"] > 1 for row in r["rows"])
    comparison = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "llm-surgeon-structured-0.8" in comparison and "magnitude-structured-0.8" in comparison
    assert (tmp_path / "sweep" / "ppl_vs_size.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "magnitude-structured-0.8" / "model.safetensors").is_file()
    c = client()
    assert {"comparison.md", "ppl_vs_size.png"} <= {f.path for f in c.list_artifacts(r["run_id"])}
    for child in r["results"]:
        assert c.get_run(child["run_id"]).data.tags["mlflow.parentRunId"] == r["run_id"]


def test_sweep_recipe_errors_name_the_variant_and_key(tiny_recipe):
    from flows.sweep import sweep_configs
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError, match=r"sweep\[1\]: unknown recipe key 'targte_size'"):
        sweep_configs({**tiny_recipe, "sweep": [{"target_size": 0.8}, {"targte_size": 0.8}]})
    with pytest.raises(SurgeonError, match="non-empty list"):
        sweep_configs(tiny_recipe)


def test_gate():
    from flows.promote import gate

    assert gate({"dense_ppl": "10", "pruned_ppl": "11.5"}, 1.15)[0]
    assert not gate({"dense_ppl": "10", "pruned_ppl": "11.6"}, 1.15)[0]
    assert not gate({"dense_ppl": "10"}, 1.15)[0]


def test_io_tasks_retry_transient_errors_only(pipeline_env):
    from prefect.states import Failed

    from surgeon.errors import SurgeonError
    from tasks import steps

    assert steps._transient(None, None, Failed(data=OSError("connection reset")))
    assert not steps._transient(None, None, Failed(data=SurgeonError("model path not found: x")))
    assert steps.load_model.retries == 2 and steps.register.retries == 2
    assert steps.prune_shot.retries == 0 and steps.evaluate.retries == 0


def test_shot_cache_key_covers_code_config_and_data_not_output(tiny_recipe, monkeypatch):
    import surgeon_core
    from surgeon.config import build_config
    from surgeon.inputs import DataRef
    from tasks import steps

    cfg = build_config(tiny_recipe)
    first, second = cfg.plan()
    src, data = steps.Weights("/m", "model-hash"), DataRef("/c.npy", "data-id", (4, 16))
    key = steps.shot_key(cfg, src, data, first, "model-hash")
    assert steps.code_version().startswith(surgeon_core.__version__ + "+")
    for elsewhere in ({"output": "/elsewhere"}, {"threads": 2}, {"eval_batch_size": 8}, {"experiment": "x"}):
        assert key == steps.shot_key(build_config({**tiny_recipe, **elsewhere}), src, data, first, "model-hash")
    assert key != steps.shot_key(cfg, src, data, second, "model-hash")
    assert key != steps.shot_key(cfg, src, DataRef("/c.npy", "other-data", (4, 16)), first, "model-hash")
    assert key != steps.shot_key(build_config({**tiny_recipe, "seed": 1}), src, data, first, "model-hash")
    assert key != steps.shot_key(cfg, src, data, first, "other-model")
    monkeypatch.setattr(steps, "code_version", lambda: "0.0.0+changed")
    assert key != steps.shot_key(cfg, src, data, first, "model-hash")


@pytest.fixture(scope="session")
def zeroshot_recipe(tiny_recipe, pipeline_env) -> dict:
    """tiny_recipe + two offline lm-eval tasks (surgeon make-task) of 4 documents each."""
    from surgeon.zeroshot import make_task
    from tiny_io import synthetic_prose

    text = pipeline_env / "prose.txt"
    text.write_text(synthetic_prose(30, seed=5))
    tasks = pipeline_env / "zs-tasks"
    make_task("lastword", text, tasks, name="lw", n=8, holdout=1.0)
    make_task("choice", text, tasks, name="mc", n=8, holdout=1.0)
    return {**tiny_recipe, "zeroshot_tasks": "lw,mc", "task_dir": str(tasks), "zeroshot_limit": 4,
            "register_model": False}


@pytest.fixture
def zeroshot_calls(monkeypatch):
    """The model folders that the zero-shot task really evaluates (a cache hit does not call lm-eval)."""
    from surgeon import zeroshot

    real, calls = zeroshot.evaluate_dir, []

    def spy(model_dir, *args, **kwargs):
        calls.append(model_dir)
        return real(model_dir, *args, **kwargs)

    monkeypatch.setattr(zeroshot, "evaluate_dir", spy)
    return calls


def test_prune_flow_zeroshot_tracked_and_dense_baseline_cached(zeroshot_recipe, zeroshot_calls, tmp_path):
    import json

    from prefect.artifacts import Artifact

    from flows.prune import prune_flow

    r = prune_flow({**zeroshot_recipe, "shots": 2, "target_size": 0.8, "eval_at": [0.9],
                    "output": str(tmp_path / "a")})
    assert len(zeroshot_calls) == 3  # dense, shot 1 (eval_at 0.9), shot 2
    for zs in (r["dense_zeroshot"], r["zeroshot"]):
        assert set(zs["tasks"]) == {"lw", "mc"} and all(m["n"] == 4 for m in zs["tasks"].values())
        assert zs["average"] == pytest.approx((zs["tasks"]["lw"]["acc"] + zs["tasks"]["mc"]["acc"]) / 2)
    assert [row["acc_avg"] for row in r["rows"]][-1] == r["zeroshot"]["average"]

    c = client()
    for name in ("zeroshot/lw/acc", "zeroshot/mc/acc_norm", "zeroshot/acc_avg", "seconds/zeroshot"):
        assert [m.step for m in c.get_metric_history(r["run_id"], name)] == [0, 1, 2], name
    assert c.get_metric_history(r["run_id"], "zeroshot/lw/acc")[-1].value == r["zeroshot"]["tasks"]["lw"]["acc"]
    files = {f.path for f in c.list_artifacts(r["run_id"], "zeroshot")}
    assert files == {"zeroshot/dense.json", "zeroshot/shot-1.json", "zeroshot/shot-2.json"}
    full = json.load(open(c.download_artifacts(r["run_id"], "zeroshot/shot-2.json")))
    assert full["results"]["mc"]["acc,none"] == r["zeroshot"]["tasks"]["mc"]["acc"] and "configs" in full
    table = Artifact.get("prune-tiny-llama-zeroshot")
    assert table is not None and table.type == "table" and "mc" in str(table.data)

    # another target: the dense baseline (same model, same task set) comes from the cache
    r2 = prune_flow({**zeroshot_recipe, "shots": 1, "target_size": 0.6, "output": str(tmp_path / "b")})
    assert len(zeroshot_calls) == 4 and r2["dense_zeroshot"] == r["dense_zeroshot"]
    # a different task set is a different baseline
    prune_flow({**zeroshot_recipe, "shots": 1, "target_size": 0.6, "zeroshot_tasks": "mc",
                "output": str(tmp_path / "c")})
    assert len(zeroshot_calls) == 6


def test_sweep_report_methods_by_sizes_with_zeroshot(zeroshot_recipe, tmp_path):
    from flows.sweep import sweep_flow

    out = tmp_path / "sweep"
    recipe = {**zeroshot_recipe, "shots": 1, "output": str(out),
              "sweep": [{"method": "llm-surgeon", "target_size": 0.8}, {"method": "llm-surgeon", "target_size": 0.6},
                        {"method": "magnitude", "target_size": 0.8}]}
    r = sweep_flow(recipe)
    assert all(row["acc_avg"] is not None and row["dense_acc_avg"] is not None for row in r["rows"])
    report = (out / "report.md").read_text()
    assert "| method | 80% | 60% |" in report
    assert "| llm-surgeon structured |" in report and "| magnitude structured |" in report
    assert "Mean zero-shot accuracy" in report and "| lw acc | mc acc |" in report
    for png in ("ppl_vs_size.png", "acc_vs_size.png", "allocation_heatmaps.png"):
        assert (out / png).stat().st_size > 5000 and f"]({png})" in report, png
    assert "acc_avg" in (out / "comparison.md").read_text()
    assert (out / "zeroshot.csv").read_text().startswith("variant,size,task,metric,value\n")
    logged = {f.path for f in client().list_artifacts(r["run_id"])}
    assert {"report.md", "acc_vs_size.png", "allocation_heatmaps.png", "zeroshot.csv"} <= logged


def test_prune_flow_finetunes_between_shots_logs_and_caches(tiny_recipe, shot_calls, tmp_path, monkeypatch):
    import json

    from flows.prune import prune_flow
    from surgeon_core.adapters import adapter_for, prunable_linears
    from surgeon_core.shot import model_size
    from tasks import steps
    from transformers import AutoModelForCausalLM

    real, ft_calls = steps.runner.finetune_step_dir, []

    def spy(cfg, source_dir, windows_path, step, ckpt_dir, log=None):
        ft_calls.append((step.shot, step.finetune_steps))
        ft_paths.append(windows_path)
        return real(cfg, source_dir, windows_path, step, ckpt_dir, log=log)

    ft_paths = []

    monkeypatch.setattr(steps.runner, "finetune_step_dir", spy)
    recipe = {**tiny_recipe, "finetune_steps": 2, "final_finetune_steps": 3, "finetune_lr": 1e-3,
              "finetune_patience": 0, "register_model": False}
    r = prune_flow({**recipe, "output": str(tmp_path / "ft")})
    assert ft_calls == [(1, 2), (2, 5)] and shot_calls["shots"] == [1, 2]
    assert all(row["finetune_loss"] > 0 for row in r["rows"]) and r["finetune_seconds"] > 0
    # fine-tuning kept every pruned weight at 0 and created no new zeros: the exported size is the shot's size
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft"))
    assert model_size(model)[0] == pytest.approx(r["achieved_size"], abs=1e-12)
    assert len(prunable_linears(model, adapter_for(model))) > 0

    c = client()
    assert [m.step for m in c.get_metric_history(r["run_id"], "finetune/loss/shot_1")] == [1, 2]
    assert [m.step for m in c.get_metric_history(r["run_id"], "finetune/loss/shot_2")] == [1, 2, 3, 4, 5]
    assert [m.step for m in c.get_metric_history(r["run_id"], "finetune/loss")] == list(range(1, 8))
    # validation on held-out calibration windows: step 0 is the loss before fine-tuning; the kept step is reported
    val = c.get_metric_history(r["run_id"], "finetune/val_loss/shot_2")
    assert val[0].step == 0 and len(val) >= 2 and len(r["finetune_best_steps"]) == 2
    assert [m.value for m in c.get_metric_history(r["run_id"], "finetune/best_step")] == r["finetune_best_steps"]
    assert [m.step for m in c.get_metric_history(r["run_id"], "seconds/finetune")] == [1, 2]
    assert "plots/finetune_loss.png" in {f.path for f in c.list_artifacts(r["run_id"], "plots")}
    summary = json.load(open(c.download_artifacts(r["run_id"], "summary.json")))
    assert summary["finetune_seconds"] == pytest.approx(r["finetune_seconds"])

    # a rerun to another output comes from the cache: no shot and no fine-tuning is recomputed
    again = prune_flow({**recipe, "output": str(tmp_path / "ft-again")})
    assert ft_calls == [(1, 2), (2, 5)] and shot_calls["shots"] == [1, 2] and again["ppl"] == r["ppl"]
    assert r["finetune_data_id"] is None and all("calib-" in p for p in ft_paths)

    # finetune.data: fine-tuned on that text's windows (another run: shot 2 starts from other weights)
    text = tmp_path / "ft-text.txt"
    text.write_text("".join(f"Garden {i} lies {3 * i + 1} miles down river {i * i}.\n" for i in range(40)))
    other = prune_flow({**recipe, "finetune_data": str(text), "output": str(tmp_path / "ft-other")})
    assert ft_calls[2:] == [(1, 2), (2, 5)] and shot_calls["shots"] == [1, 2, 1, 2]
    assert other["finetune_data_id"] and all("finetune-" in p for p in ft_paths[2:])


def test_finetune_cache_key_covers_its_inputs(tiny_recipe):
    from surgeon.config import build_config
    from surgeon.inputs import DataRef
    from surgeon_core.schedule import Step
    from tasks import steps

    cfg = build_config({**tiny_recipe, "finetune_steps": 2})
    step = cfg.plan()[0]
    assert (step.shot, step.finetune_steps) == (1, 2)
    w, data = steps.Weights("/s", "shot-key"), DataRef("/c.npy", "data-id", (4, 16))
    key = steps.finetune_key(cfg, w, data, step)
    assert key == steps.finetune_key(build_config({**tiny_recipe, "finetune_steps": 2, "output": "/elsewhere"}), w,
                                     data, step)
    assert key != steps.finetune_key(cfg, steps.Weights("/s", "other-shot"), data, step)
    assert key != steps.finetune_key(cfg, w, data, Step(1, 2, step.target_size, finetune_steps=3))
    assert key != steps.finetune_key(cfg, w, data, Step(2, 2, step.target_size, finetune_steps=2))
    assert key != steps.finetune_key(cfg, w, DataRef("/c.npy", "other", (4, 16)), step)
    for change in ({"finetune_lr": 1e-4}, {"finetune_train": "both"}, {"finetune_schedule": "constant"}):
        assert key != steps.finetune_key(build_config({**tiny_recipe, "finetune_steps": 2, **change}), w, data, step)


def test_sweep_fans_runs_out_on_a_local_dask_cluster(tiny_recipe, tmp_path):
    """prefect-dask: the two runs of a sweep go to the two worker processes of a LocalCluster; both are tracked."""
    from flows.sweep import run_sweep

    recipe = {**tiny_recipe, "shots": 1, "register_model": False, "output": str(tmp_path / "dask-sweep"),
              "sweep": [{"method": "llm-surgeon", "target_size": 0.8}, {"method": "kobd", "target_size": 0.8}]}
    r = run_sweep(recipe, dask="local:2")
    assert [row["variant"] for row in r["rows"]] == ["llm-surgeon-structured-0.8", "kobd-structured-0.8"]
    assert all(row["ppl"] > 1 and row["size"] < 0.85 for row in r["rows"])
    assert sorted(child["worker"] for child in r["results"]) == [0, 1]  # one run per Dask worker
    c = client()
    for child in r["results"]:
        run = c.get_run(child["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == r["run_id"]
        assert run.data.metrics["final/ppl"] == pytest.approx(child["ppl"])
    assert (tmp_path / "dask-sweep" / "kobd-structured-0.8" / "model.safetensors").is_file()


def test_dask_spec_parsing():
    from flows.sweep import dask_task_runner
    from surgeon.errors import SurgeonError

    local = dask_task_runner("local:3")
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    assert dask_task_runner("local").cluster_kwargs["n_workers"] == 2  # a CPU recipe: two workers
    assert dask_task_runner("tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    for bad in ("local:0", "local:x", "nowhere"):
        with pytest.raises(SurgeonError, match="--dask"):
            dask_task_runner(bad)
