"""Honest speed reports (surgeon.speed): interleaved rounds in alternating order, the median speed-up with its
spread, a change claimed only outside the spread, "no measurable change" for a model with nothing removed, and the
device and threads named."""

import pytest
import torch

from surgeon import speed
from surgeon.models import save_model
from tiny_io import tiny_tokenizer
from tiny_models import tiny_model

pytestmark = pytest.mark.integration


def _ratios(*values):
    return speed.spread(values)


def test_spread_is_median_quartiles_and_extremes():
    s = speed.spread([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert speed.spread([2.5]) == {"median": 2.5, "q1": 2.5, "q3": 2.5, "min": 2.5, "max": 2.5, "n": 1}
    with pytest.raises(ValueError):
        speed.spread([])


@pytest.mark.parametrize("ratios, expected", [
    ((1.20, 1.25, 1.22, 1.30, 1.18), "faster"),
    ((0.80, 0.85, 0.82, 0.90, 0.78), "slower"),
    ((1.10, 0.71, 1.32, 0.95, 1.05), speed.NO_CHANGE),  # the median is above 1, the middle half is not
    ((1.50, 1.60), speed.NO_CHANGE),  # two rounds measure no spread worth the name
])
def test_verdict_claims_a_change_only_outside_the_spread(ratios, expected):
    assert speed.verdict(_ratios(*ratios)) == expected


def _scripted_compare(monkeypatch, times: dict[str, list[float]], repeats: int):
    """compare() on two tiny models with measure() replaced by scripted seconds; returns (result, call order)."""
    calls = []
    dense, pruned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    names = {id(dense): "dense", id(pruned): "pruned"}
    counters = {"dense": 0, "pruned": 0}

    def fake_measure(model, **_kw):
        name = names[id(model)]
        calls.append(name)
        t = times[name][counters[name] % len(times[name])]
        counters[name] += 1
        return {"prefill_seconds": t, "decode_seconds": t}

    monkeypatch.setattr(speed, "measure", fake_measure)
    return speed.compare(dense, pruned, repeats=repeats, warmup=0), calls


def test_rounds_alternate_and_paired_ratios_give_the_verdict(monkeypatch):
    res, calls = _scripted_compare(monkeypatch, {"dense": [1.0, 1.1, 0.9, 1.0, 1.2], "pruned": [0.5]}, repeats=5)
    assert calls == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense", "dense", "pruned"]
    s = res["prefill_speedup_spread"]
    assert res["prefill_speedup"] == pytest.approx(2.0) and s["min"] == pytest.approx(1.8) \
        and s["max"] == pytest.approx(2.4)
    assert res["prefill_verdict"] == res["decode_verdict"] == "faster"
    assert res["dense"]["prefill_seconds_spread"]["median"] == pytest.approx(1.0)
    assert res["measured_on"]["threads"] == torch.get_num_threads()
    assert "x2.000" in speed.speed_summary(res) and "5 interleaved rounds" in speed.speed_summary(res)


def test_noise_larger_than_the_difference_claims_nothing(monkeypatch):
    # the pruned model's median is 10% faster, but the rounds scatter by more than that
    res, _ = _scripted_compare(monkeypatch, {"dense": [1.0, 1.0, 0.8, 1.0, 1.3, 0.8, 1.0],
                                             "pruned": [0.9, 1.1, 1.0, 0.9, 1.0, 0.9, 0.95]}, repeats=7)
    assert res["prefill_speedup"] > 1.0
    assert res["prefill_verdict"] == speed.NO_CHANGE


@pytest.mark.heavy
def test_structure_report_of_a_model_with_nothing_removed(tmp_path):
    model = tiny_model("llama", seed=0)
    save_model(model, tiny_tokenizer(), tmp_path / "dense")
    save_model(model, tiny_tokenizer(), tmp_path / "pruned")  # the same weights: no unit is all zero
    lines = []
    report = speed.structure_report(str(tmp_path / "pruned"), str(tmp_path / "dense"), threads=1, repeats=3,
                                    prefill_len=16, decode_tokens=2, log=lines.append)
    sp = report["speed"]
    assert sp["nothing_removed"] is True
    assert sp["prefill_verdict"] == sp["decode_verdict"] == speed.NO_CHANGE
    assert sp["measured_on"]["device"] == "cpu" and sp["measured_on"]["threads"] == 1
    assert sp["measured_on"]["name"]
    summary = speed.speed_summary(sp)
    assert "no measurable change" in summary and "nothing removed" in summary and "1 thread(s)" in summary
    assert sum("timing round" in line for line in lines) == 3
    assert any("materializing" in line for line in lines)


def test_bench_speed_metrics_carry_every_name_the_speed_configs_expect(monkeypatch):
    from pathlib import Path

    from surgeon import bench

    def fake_report(*_args, **_kw):
        ratios = speed.spread([1.1, 1.2, 1.3])
        sp = {"ideal_speedup": 1.29, "settings": {"repeats": 3}, "measured_on": speed.measured_on("cpu")}
        for work in ("prefill", "decode"):
            sp.update({f"{work}_speedup": ratios["median"], f"{work}_speedup_spread": ratios,
                       f"{work}_verdict": speed.verdict(ratios)})
        return {"speed": sp, "parameters": {"materialized_total": 10, "dense_total": 20, "prunable_fraction": 0.5},
                "file_bytes": {"dense": 200, "materialized": 100, "zeroed": 200}}

    monkeypatch.setattr(speed, "structure_report", fake_report)
    configs = sorted(Path(__file__).resolve().parents[2].joinpath("benchmarks", "configs").glob("speed-*.yaml"))
    assert configs
    for path in configs:
        cfg, block, _ = bench.load_bench(path)
        metrics = bench._speed(cfg, block, {"source_path": "models/x", "output": "out"})
        missing = set(block["expect"]) - set(metrics) - {"dense_ppl", "ppl", "achieved_size"}
        assert not missing, (path.name, missing)
        assert metrics["prefill_verdict"] == "faster" and metrics["rounds"] == 3
        assert metrics["file_bytes"] == 100 and metrics["dense_file_bytes"] == 200
