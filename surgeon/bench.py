"""Benchmarks as recipes: ``benchmarks/configs/NAME.yaml`` is a recipe plus a ``benchmark:`` block (title, group,
machine class, kind, expected values, tolerance, optional reference values). :func:`run_bench` runs it through
the runner users run (:func:`surgeon.runner.run`) and writes ``benchmarks/results/NAME.json`` with the commit, the
machine, the library versions, the seconds and every metric.

Kinds: ``quality`` (default: the run's perplexities and sizes), ``shot`` (the seconds of one shot, e.g. on a
random-weight 7B architecture) and ``speed`` (the run, then the materialized model's size and speed against the
dense model's)."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .benchmark_report import check_metrics
from .config import build_config, merge, parse_overrides, read_yaml
from .errors import SurgeonError
from .utils import atomic_write, phase_logger

__all__ = ["load_bench", "list_configs", "run_bench", "metrics_of", "KINDS"]

KINDS = ("quality", "shot", "speed")
BENCH_KEYS = {"title", "group", "machine", "kind", "expect", "tolerance", "reference", "reference_source", "notes",
              "speed"}
_log = logging.getLogger("surgeon.bench")


def load_bench(path: str | Path, overrides: list[str] | None = None):
    """(config, benchmark block, name) of a benchmark config; ``overrides`` are ``key=value`` on the recipe."""
    path = Path(path)
    data = read_yaml(path)
    block = data.pop("benchmark", None)
    if not isinstance(block, dict):
        raise SurgeonError(f"{path}: a benchmark config needs a 'benchmark:' mapping (title, group, machine, expect)")
    unknown = set(block) - BENCH_KEYS
    if unknown:
        raise SurgeonError(f"{path}: unknown benchmark key(s) {sorted(unknown)}; known: {sorted(BENCH_KEYS)}")
    block.setdefault("kind", "quality")
    if block["kind"] not in KINDS:
        raise SurgeonError(f"{path}: benchmark kind must be one of {', '.join(KINDS)}, not {block['kind']!r}")
    block.setdefault("expect", {})
    block.setdefault("tolerance", 0.0)
    try:
        cfg = build_config(merge(data, {"register_model": False}, parse_overrides(overrides or [])))
    except SurgeonError as exc:
        raise SurgeonError(f"{path}: {exc}") from exc
    return cfg, block, path.stem


def list_configs(folder: str | Path = "benchmarks/configs", results: str | Path = "benchmarks/results") -> list[dict]:
    """Every config in ``folder`` with its title, group, machine and the status of its last result."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SurgeonError(f"no benchmark configs folder {folder} (run from the repository root)")
    out = []
    for path in sorted(folder.glob("*.yaml")):
        block = read_yaml(path).get("benchmark") or {}
        res = Path(results) / f"{path.stem}.json"
        status = "not run"
        if res.is_file():
            r = json.loads(res.read_text())
            status = f"{'passed' if r.get('passed') else 'FAILED'} ({r.get('date', '?')[:10]}, {r.get('commit', '?')})"
        out.append({"name": path.stem, "title": block.get("title", ""), "group": block.get("group", ""),
                    "machine": block.get("machine", ""), "kind": block.get("kind", "quality"), "path": str(path),
                    "status": status})
    return out


def metrics_of(result: dict) -> dict:
    """The metrics of a run's result: final and per-evaluated-size perplexity, size, seconds, memory."""
    m: dict = {}
    if "dense" in result:
        m["dense_ppl"] = result["dense"]["ppl"]
    for name, e in (result.get("dense_also") or {}).items():
        m[f"dense_ppl/{name}"] = e["ppl"]
    for row in result.get("steps", []):
        if row.get("eval"):
            m[f"ppl@{round(row['target_size'], 4):g}"] = row["eval"]["ppl"]
        for name, e in (row.get("eval_also") or {}).items():
            m[f"ppl/{name}@{round(row['target_size'], 4):g}"] = e["ppl"]
    for name, ppl in (result.get("ppl_also") or {}).items():
        m[f"ppl/{name}"] = ppl
    if result.get("finetune"):
        last = result["finetune"][-1]
        m.update({k: v for k, v in (("finetune_best_step", last["best_step"]), ("finetune_steps_run", last["steps"]))
                  if v is not None})
    for key in ("ppl", "achieved_size", "seconds_per_shot", "peak_rss_gb", "peak_gpu_gb"):
        if result.get(key) is not None:
            m[key] = result[key]
    if "steps" in result and result["steps"]:
        m["shot_seconds"] = sum(result["steps"][0]["seconds"].values())
    return m


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _machine(device: str, threads: int | None) -> dict:
    d = torch.device(device)
    gpu = torch.cuda.get_device_name(d) if d.type == "cuda" and torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = torch.cuda.get_device_properties(d).total_memory / 1024**3 if gpu else None
    return {"class": "gpu" if gpu else "cpu", "device": device, "device_name": gpu or cpu, "cpu": cpu,
            "cores": cores, "threads": threads or torch.get_num_threads(), "gpu": gpu, "gpu_memory_gb": mem}


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "llm-surgeon"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# the structure report's own timing protocol: a prompt of 32 tokens, one warm-up round; fp32 on a CPU, bf16 compiled
# with CUDA-graph decoding on a GPU
_REPORT_FIXED = {"prompt_len": 32, "warmup": 1}
_REPORT_TAKES = ("prefill_len", "decode_tokens", "repeats", "align", "prefill_batch", "decode_batch")
_REPORT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}


def speed_settings(speed: dict, cfg) -> dict:
    """The structure report's arguments from a benchmark's ``speed:`` block (defaults: the recipe's compute threads
    and output report settings); a setting the report does not take must equal what it does, or the config is
    refused rather than silently timed another way."""
    out = {"threads": speed.get("threads", cfg.compute.threads), "device": speed.get("device", cfg.output.report_device),
           "decode_attention": speed.get("decode_attention", cfg.output.report_decode_attention)}
    out.update({k: speed[k] for k in _REPORT_TAKES if k in speed})
    on_gpu = out["device"] == "cuda"
    fixed = {**_REPORT_FIXED, "dtype": _REPORT_DTYPE.get(out["device"]), "compile": on_gpu, "decode_graph": on_gpu}
    bad = {k: v for k, v in speed.items() if k in fixed and v != fixed[k]}
    unknown = set(speed) - set(out) - set(fixed)
    if bad or unknown:
        raise SurgeonError(f"speed settings the structure report does not take: {sorted(set(bad) | unknown)} "
                           f"(it times {fixed} on {out['device']})")
    return out


def _speed(cfg, block: dict, result: dict) -> dict:
    from .speed import structure_report

    if result["source_path"].startswith("random:"):
        raise SurgeonError("speed benchmarks of random-weight architectures are not supported by surgeon bench yet")
    rep = structure_report(result["output"], result["source_path"], log=_log.info,
                           **speed_settings(block.get("speed") or {}, cfg))
    sp, params, files = rep["speed"], rep["parameters"], rep["file_bytes"]
    out = {"ideal_speedup": sp["ideal_speedup"], "parameters": params["materialized_total"],
           "dense_parameters": params["dense_total"], "prunable_fraction": params["prunable_fraction"],
           "file_bytes": files["materialized"], "dense_file_bytes": files["dense"],
           "rounds": sp["settings"]["repeats"]}
    for work in ("prefill", "decode"):
        r = sp[f"{work}_speedup_spread"]
        out.update({f"{work}_speedup": r["median"], f"{work}_speedup_q1": r["q1"], f"{work}_speedup_q3": r["q3"],
                    f"{work}_verdict": sp[f"{work}_verdict"]})
    return out


def run_bench(config_path: str | Path, *, device: str | None = None, json_path: str | Path | None = None,
              nproc: int | None = None, checkpoint: str | Path | None = None, stop_after: int | None = None,
              overrides: list[str] | None = None, results_dir: str | Path = "benchmarks/results") -> dict:
    """Run a benchmark config through the runner and write its result (``results_dir/NAME.json`` and ``json_path``).
    ``device``/``nproc`` override the recipe's; ``checkpoint``/``stop_after`` split a long run over several calls
    (a stopped run writes no result)."""
    from .runner import run

    extra = list(overrides or [])
    if device:
        extra.append(f"compute.device={device}")
    if nproc:
        extra.append(f"compute.nproc={nproc}")
    cfg, block, name = load_bench(config_path, extra)
    log = _log if _log.handlers or logging.getLogger().handlers else _stderr_logger()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"surgeon-bench-{name}-") as tmp:
        if block["kind"] == "speed":
            cfg.output.path = str(Path(tmp) / "pruned")
            cfg.output.overwrite = True
        if block["kind"] == "shot":
            stop_after = 1 if stop_after is None else stop_after
        result = run(cfg, checkpoint=checkpoint, progress=phase_logger(log), stop_after=stop_after, log=log)
        if result.get("stopped_after") and block["kind"] != "shot":
            log.info("stopped after %d step(s); the checkpoint resumes the run", result["stopped_after"])
            return result
        metrics = metrics_of(result)
        if block["kind"] == "speed":
            metrics.update(_speed(cfg, block, result))
    failures = check_metrics(block["expect"], block["tolerance"], metrics)
    out = {"name": name, "config": str(config_path), "title": block.get("title", name), "group": block.get("group"),
           "kind": block["kind"],
           "commit": _git("rev-parse", "--short", "HEAD") or os.environ.get("SURGEON_COMMIT", "")[:7],
           "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": _machine(cfg.compute.device, cfg.compute.threads), "versions": _versions(),
           "seconds": time.perf_counter() - t0, "metrics": metrics, "expect": block["expect"],
           "tolerance": block["tolerance"], "reference": block.get("reference"),
           "reference_source": block.get("reference_source"), "passed": not failures, "failures": failures,
           "steps": [_step_row(r) for r in result.get("steps", [])], "recipe": cfg.recipe()}
    text = json.dumps(out, indent=1, default=str)
    atomic_write(Path(results_dir) / f"{name}.json", text)
    if json_path:
        atomic_write(Path(json_path), text)
    return out


def _step_row(row: dict) -> dict:
    keep = ("shot", "num_shots", "target_size", "achieved_size", "estimated_loss", "seconds", "damping_escalations",
            "peak_rss_gb", "peak_gpu_gb")
    out = {k: row[k] for k in keep if k in row}
    if row.get("eval"):
        out["ppl"] = row["eval"]["ppl"]
    if row.get("finetune"):
        losses = row["finetune"].get("losses") or [None]
        out["finetune"] = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                           "seconds": row["finetune"].get("seconds"), "loss": row["finetune"].get("loss"),
                           "validation": row["finetune"].get("validation"),
                           "best_step": row["finetune"].get("best_step"),
                           "kept_pre_finetune": row["finetune"].get("kept_pre_finetune")}
    if row.get("eval_also"):
        out["ppl_also"] = {name: e["ppl"] for name, e in row["eval_also"].items()}
    return out


def _stderr_logger() -> logging.Logger:
    log = logging.getLogger("surgeon.bench.progress")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
