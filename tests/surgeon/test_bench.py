"""`surgeon.bench`: a benchmark config runs through the runner and writes its result (commit, machine, versions,
metrics, the expected values checked); ``list_configs`` lists configs with their last status; config errors name the
file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from surgeon.errors import SurgeonError
from tiny_io import run_inputs, tiny_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return run_inputs(tmp_path_factory.mktemp("bench"))


recipe = tiny_recipe


def bench_config(inputs, folder: Path, name: str, expect: dict, tolerance=0.0) -> Path:
    data = recipe(inputs)
    data["method"] = {**data["method"], "shots": 2}
    data["benchmark"] = {"title": f"tiny {name}", "group": "tests", "machine": "cpu", "expect": expect,
                         "tolerance": tolerance}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.heavy
def test_run_bench_writes_the_result_and_checks_the_expected_values(inputs, tmp_path):
    from surgeon.bench import list_configs, run_bench

    configs, results = tmp_path / "configs", tmp_path / "results"
    good = bench_config(inputs, configs, "good", {"achieved_size": 0.7}, tolerance=0.05)
    bad = bench_config(inputs, configs, "bad", {"achieved_size": 0.3, "ppl": 1.0e9, "peak_gpu_gb": 1.0},
                       tolerance={"achieved_size": 0.01, "ppl": 0.1})
    bench_config(inputs, configs, "never", {})
    ck = tmp_path / "ck"  # the same recipe: the second config resumes the first one's finished run

    out = run_bench(good, results_dir=results, json_path=tmp_path / "good.json", checkpoint=ck)
    saved = json.loads((results / "good.json").read_text())
    assert saved == json.loads((tmp_path / "good.json").read_text()) == json.loads(json.dumps(out, default=str))
    assert saved["passed"] is True and saved["failures"] == [] and saved["name"] == "good"
    assert saved["commit"] and saved["date"] and isinstance(saved["dirty"], bool)
    assert saved["machine"]["class"] == "cpu" and saved["machine"]["threads"] == 1 and saved["machine"]["cores"]
    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["python"]
    m = saved["metrics"]
    assert {"dense_ppl", "ppl", "ppl@0.85", "achieved_size", "seconds_per_shot", "peak_rss_gb", "shot_seconds"} <= set(m)
    assert abs(m["achieved_size"] - 0.7) < 0.01 and m["ppl"] > 1
    assert [s["shot"] for s in saved["steps"]] == [1, 2] and saved["recipe"]["method"]["shots"] == 2

    failed = run_bench(bad, results_dir=results, checkpoint=ck)
    assert failed["passed"] is False and failed["metrics"]["ppl"] == out["metrics"]["ppl"]
    lines = dict(line.split(": ", 1) for line in failed["failures"])  # one line per missed metric
    assert sorted(lines) == ["achieved_size", "peak_gpu_gb", "ppl"] and len(failed["failures"]) == 3
    assert lines["achieved_size"].startswith("0.7") and "expected 0.3 (tolerance 0.01)" in lines["achieved_size"]
    assert "expected" in lines["ppl"] and lines["peak_gpu_gb"].startswith("not measured")
    assert json.loads((results / "bad.json").read_text())["failures"] == failed["failures"]

    listed = {c["name"]: c for c in list_configs(configs, results)}
    assert sorted(listed) == ["bad", "good", "never"]
    assert listed["good"]["status"].startswith("passed (") and listed["bad"]["status"].startswith("FAILED (")
    assert listed["never"]["status"] == "not run"
    assert listed["good"]["title"] == "tiny good" and listed["good"]["group"] == "tests"
    assert listed["good"]["machine"] == "cpu" and listed["good"]["kind"] == "quality"
    with pytest.raises(SurgeonError, match="no benchmark configs folder"):
        list_configs(tmp_path / "nowhere", results)


def test_bench_config_errors_name_the_file(inputs, tmp_path):
    from surgeon.bench import load_bench

    path = bench_config(inputs, tmp_path, "typo", {})
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "benchmark": {**data["benchmark"], "expcet": {}}}))
    with pytest.raises(SurgeonError, match=r"typo.yaml: unknown benchmark key\(s\) \['expcet'\]"):
        load_bench(path)
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "benchmark"}))
    with pytest.raises(SurgeonError, match="needs a 'benchmark:' mapping"):
        load_bench(path)
    cfg, block, name = load_bench(bench_config(inputs, tmp_path, "ok", {}), ["method.shots=1"])
    assert name == "ok" and cfg.method.shots == 1 and cfg.output.register_model is False
    assert block["kind"] == "quality" and block["tolerance"] == 0.0


def test_speed_settings_pass_what_the_report_takes_and_refuse_the_rest():
    from surgeon.bench import load_bench, speed_settings

    cfg, block, _ = load_bench(Path(__file__).parents[2] / "benchmarks/configs/speed-smollm2-cpu.yaml")
    got = speed_settings(block["speed"], cfg)
    assert got["repeats"] == block["speed"]["repeats"] and got["prefill_len"] == block["speed"]["prefill_len"]
    assert got["threads"] == block["speed"]["threads"] and got["device"] == "cpu"
    with pytest.raises(SurgeonError, match="prompt_len"):
        speed_settings({**block["speed"], "prompt_len": 8}, cfg)
    with pytest.raises(SurgeonError, match="nonsense"):
        speed_settings({"nonsense": 1}, cfg)
