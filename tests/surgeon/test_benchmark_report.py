"""Benchmark configs (benchmarks/configs/*.yaml) are well-formed, and surgeon.benchmark_report turns configs and
results into BENCHMARKS.md: tables per group, pass/fail by tolerance, "not run yet", at most 250 lines."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from surgeon import benchmark_report as br

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "benchmarks" / "configs"
CONFIG_PATHS = sorted(CONFIGS.glob("*.yaml"))
METHODS = {"llm-surgeon", "kobd", "lobd", "magnitude", "sparsegpt", "wanda"}
HEADLINE = {"a1-structured", "p-structured-40", "p-unstructured-5", "p-unstructured-40", "p-unstructured-40-ft",
            "p-2of4-5", "p-2of4-40", "p-2of4-40-ft", "p-wanda-50", "p-wanda-2of4", "p-sparsegpt-50",
            "p-sparsegpt-2of4", "p-magnitude-50", "p-magnitude-2of4", "p-structured-70-finetune",
            "speed-smollm2-cpu", "speed-7b-gpu", "shot-7b-structured", "shot-7b-unstructured", "shot-7b-2of4",
            "cpu-smoke"}


def test_the_headline_configs_exist():
    assert HEADLINE <= {p.stem for p in CONFIG_PATHS}


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.stem)
def test_config_is_a_recipe_with_a_benchmark_block(path):
    cfg = yaml.safe_load(path.read_text())
    assert isinstance(cfg, dict) and isinstance(cfg.get("model"), str)
    method = cfg["method"]
    assert method["name"] in METHODS
    assert re.fullmatch(r"unstructured|structured|coupled|\d+:\d+", str(method["structure"]))
    assert 0 < method["target_size"] <= 1 and method["shots"] >= 1
    data = cfg["calibration"]["data"]
    in_repo = ("random:", "data/", "builtin:")  # in-repo data or the product's built-in texts, no machine staging
    assert data.startswith(in_repo), data
    if "eval" in cfg:
        assert cfg["eval"]["data"].startswith(in_repo[1:]), cfg["eval"]["data"]
    assert cfg["compute"]["device"] in ("cpu", "cuda")

    bench = cfg["benchmark"]
    assert isinstance(bench["title"], str) and bench["title"]
    assert bench["group"] in br.GROUPS
    assert bench["machine"] in br.MACHINES
    assert (bench["machine"] == "gpu") == (cfg["compute"]["device"] == "cuda")
    expect, tol = bench["expect"], bench["tolerance"]
    assert isinstance(expect, dict) and all(isinstance(v, (int, float)) for v in expect.values())
    if isinstance(tol, dict):
        assert set(tol) == set(expect), "a tolerance mapping names every expected metric"
        assert all(v >= 0 for v in tol.values())
    else:
        assert tol >= 0
    if "reference" in bench:
        assert bench.get("reference_source") and isinstance(bench["reference"], dict)
    if bench.get("kind") in ("speed", "shot"):
        assert cfg["method"]["name"] == "llm-surgeon"
    if path.stem.startswith("shot-"):
        assert bench["kind"] == "shot" and method["shots"] == 1 and "shot_seconds" in expect


def test_a1_must_match_exactly_and_p_within_the_rerun_spread():
    a1 = yaml.safe_load((CONFIGS / "a1-structured.yaml").read_text())["benchmark"]
    assert all(a1["tolerance"][k] == 0.0 for k in a1["expect"] if k.startswith("ppl@"))
    for name in ("p-unstructured-40", "p-2of4-40", "p-wanda-2of4", "p-sparsegpt-50"):
        b = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["benchmark"]
        assert br.tolerance_for(b["tolerance"], "ppl") == 0.015


def test_check_metric_directions_and_rounding():
    assert br.check_metric("ppl@0.9", 51.040, 51.0403, 0.0)  # within the printed rounding
    assert not br.check_metric("ppl@0.9", 51.040, 51.041, 0.0)
    assert not br.check_metric("ppl", 100.0, 98.0, 0.015)  # better beyond the tolerance is a change too
    assert br.check_metric("ppl", 100.0, 101.4, 0.015)
    assert br.check_metric("seconds_per_shot", 94.7, 50.0, 0.15)  # faster never fails
    assert not br.check_metric("seconds_per_shot", 94.7, 110.0, 0.15)
    assert br.check_metric("prefill_speedup", 1.2, 1.5, 0.05) and not br.check_metric("decode_speedup", 1.2, 1.1, 0.05)
    assert not br.check_metric("ideal_speedup", 1.292, 1.4, 0.01)
    assert not br.check_metric("ppl", 1.0, None, 0.1) and not br.check_metric("ppl", 1.0, float("nan"), 0.1)
    assert br.check_metrics({"ppl": 10.0, "dense_ppl": 5.0}, {"ppl": 0.1, "dense_ppl": 0.0},
                            {"ppl": 10.5}) == ["dense_ppl: not measured (expected 5)"]


def _config(path: Path, group: str, expect: dict, tolerance, **extra) -> None:
    cfg = {"model": "smollm2-135m", "method": {"name": "llm-surgeon", "structure": "structured", "target_size": 0.7,
                                               "shots": 2},
           "calibration": {"data": "data/x.npy"}, "compute": {"device": "cpu"},
           "benchmark": {"title": f"title of {path.stem}", "group": group, "machine": "cpu", "expect": expect,
                         "tolerance": tolerance, **extra}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _result(path: Path, metrics: dict, **extra) -> None:
    res = {"name": path.stem, "commit": "abc1234def", "dirty": False, "date": "2026-12-07T10:00:00Z",
           "machine": {"class": "cpu", "device": "cpu", "device_name": "AMD EPYC 9B14", "cores": 2, "threads": 2,
                       "gpu": None, "gpu_memory_gb": None},
           "versions": {"python": "3.11.7", "torch": "2.13.0"}, "seconds": 1234.5, "metrics": metrics,
           "passed": True, "failures": [], **extra}
    path.write_text(json.dumps(res))


def test_report_tables_pass_fail_and_not_run(tmp_path):
    configs, results = tmp_path / "benchmarks" / "configs", tmp_path / "benchmarks" / "results"
    configs.mkdir(parents=True)
    results.mkdir()
    _config(configs / "good.yaml", "a1", {"ppl@0.9": 51.04, "ppl@0.7": 121.196}, 0.0,
            reference={"ppl@0.7": 127.795}, reference_source="the reference code")
    _config(configs / "bad.yaml", "a1", {"ppl": 40.0}, 0.015)
    _config(configs / "later.yaml", "p", {"ppl": 42.217}, 0.015)
    _result(results / "good.json", {"ppl@0.9": 51.0401, "ppl@0.7": 121.196, "ppl": 121.196})
    _result(results / "bad.json", {"ppl": 41.0}, passed=False, failures=["ppl: 41 vs 40"])
    _result(results / "stray.json", {"ppl": 1.0})  # no config: left out
    (tmp_path / "benchmarks" / "deviations.md").write_text("# Known deviations\n\n## One thing\n\nIt is so.\n")

    out = br.write_report(configs, results, tmp_path / "BENCHMARKS.md", plots=False)
    text = out.read_text()
    lines = text.splitlines()
    assert text.startswith("# Benchmarks") and "surgeon bench --report" in text and "Q4_1" in text
    assert "3 configs: 1 pass, 1 fail, 1 not run yet." in text
    assert text.index(f"## {br.GROUPS['a1']}") < text.index(f"## {br.GROUPS['p']}") < text.index("## Known deviations")
    good = [line for line in lines if line.startswith("| [good](benchmarks/configs/good.yaml)")]
    assert len(good) == 1 and "| ppl@0.9 | 51.04 | 51.0401 | pass |" in good[0]
    assert "| 1234.5 | abc1234 | 2026-12-07 |" in good[0]
    assert "| ppl@0.7 | 121.196 | 121.196 | pass | 127.795 | 0.948 |" in text
    assert ("| [bad](benchmarks/configs/bad.yaml) | title of bad | cpu: AMD EPYC 9B14 | ppl | 40 | 41 | **FAIL** |"
            in text)
    assert "- `bad`: ppl: 41 vs 40" in text
    assert "Not run yet: [`later`](benchmarks/configs/later.yaml) (cpu)." in lines  # one line, not a table row
    assert "| [later]" not in text
    assert "stray" not in text
    assert "| cpu | AMD EPYC 9B14 | 2 cores, 2 threads | python 3.11.7, torch 2.13.0 | 2 |" in text
    assert "### One thing" in lines and "It is so." in lines
    assert br.write_report(configs, results, tmp_path / "again.md", plots=False).read_text() == text  # deterministic


def test_a_result_without_expectations_shows_the_figures_of_its_kind(tmp_path):
    configs, results = tmp_path / "benchmarks" / "configs", tmp_path / "benchmarks" / "results"
    configs.mkdir(parents=True)
    results.mkdir()
    _config(configs / "fast.yaml", "a1", {}, 0.0, kind="speed")
    _config(configs / "sweep.yaml", "a1", {}, 0.0)
    _config(configs / "one.yaml", "a1", {}, 0.0)
    _result(results / "fast.json", {"ppl": 30.0, "achieved_size": 0.69, "parameters": 99, "file_bytes": 396,
                                    "dense_file_bytes": 500, "prefill_speedup": 1.095, "decode_speedup": 1.134,
                                    "peak_rss_gb": 4.5})
    _result(results / "sweep.json", {"dense_ppl": 10.0, "ppl@0.9": 12.0, "ppl@0.8": 15.0, "ppl": 15.0,
                                     "achieved_size": 0.8, "seconds_per_shot": 3.0})
    _result(results / "one.json", {"dense_ppl": 10.0, "ppl@0.5": 20.0, "ppl": 20.0, "ppl/docs@0.5": 14.0,
                                   "ppl/docs": 14.0, "achieved_size": 0.5, "peak_rss_gb": 2.0})
    text = br.write_report(configs, results, tmp_path / "BENCHMARKS.md", plots=False).read_text()

    def shown(name):
        block = text.split(f"| [{name}]")[1].split("\n| [")[0].split("\n\n")[0]
        return [row.split(" | ")[3] for row in ("| [" + block).splitlines()]

    assert shown("fast") == ["ppl", "achieved_size", "parameters", "file_bytes", "dense_file_bytes",
                             "prefill_speedup", "decode_speedup"]
    assert shown("sweep") == ["dense_ppl", "ppl@0.9", "ppl@0.8", "achieved_size"]
    assert shown("one") == ["dense_ppl", "ppl", "ppl/docs", "achieved_size"]


def test_report_plots_ppl_against_size(tmp_path):
    pytest.importorskip("matplotlib")
    configs, results = tmp_path / "configs", tmp_path / "results"
    configs.mkdir()
    results.mkdir()
    _config(configs / "sizes.yaml", "a1", {"ppl@0.9": 51.04, "ppl@0.7": 121.196}, 0.0)
    _result(results / "sizes.json", {"ppl@0.9": 51.04, "ppl@0.7": 121.196})
    text = br.write_report(configs, results, tmp_path / "B.md").read_text()
    assert (results / "plots" / "a1.png").stat().st_size > 0
    assert "](results/plots/a1.png)" in text


def test_real_configs_stay_within_250_lines(tmp_path):
    out = br.write_report(CONFIGS, tmp_path / "none", tmp_path / "B.md", plots=False)
    assert len(out.read_text().splitlines()) <= br.MAX_LINES
    # and with a result for every config (the most rows: all metrics measured)
    results = tmp_path / "results"
    results.mkdir()
    for path in CONFIG_PATHS:
        bench = yaml.safe_load(path.read_text())["benchmark"]
        _result(results / f"{path.stem}.json", dict(bench["expect"]) or {"ppl": 1.0, "achieved_size": 0.9})
    text = br.write_report(CONFIGS, results, tmp_path / "B2.md", plots=False).read_text()
    assert len(text.splitlines()) <= br.MAX_LINES
    assert "| not run yet |" not in text and "**FAIL**" not in text
    assert "## Known deviations" in text and "Wanda 2:4" in text


def test_module_imports_no_torch():
    code = "import sys, surgeon.benchmark_report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
