"""The CPU smoke benchmark (benchmarks/configs/cpu-smoke.yaml) through `surgeon bench`, within its tolerance: the real
SmolLM2 (Q4_1 4-bit weights de-quantized; fetched by `make demo`, `surgeon fetch-model` or CI), real text, the runner
users run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgeon_cli.main import main

pytestmark = [pytest.mark.bench, pytest.mark.realmodel]
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m"


def test_cpu_smoke_benchmark_meets_its_expected_values(tmp_path, monkeypatch, capsys):
    if not (MODEL / "config.json").is_file():
        pytest.skip("needs the fetched SmolLM2 (make demo, or surgeon fetch-model smollm2-135m --output models/smollm2-135m)")
    monkeypatch.chdir(ROOT)  # the config names the repository's data files relative to its root
    out = tmp_path / "smoke.json"
    rc = main(["bench", "benchmarks/configs/cpu-smoke.yaml", "--json", str(out), "--results-dir",
               str(tmp_path / "results"), f"model={MODEL}"])
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["passed"], capsys.readouterr().out
    assert rc == 0
    assert set(result["expect"]) <= set(result["metrics"])
    assert json.loads((tmp_path / "results" / "cpu-smoke.json").read_text()) == result
