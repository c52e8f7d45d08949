"""Benchmarks: ``bench CONFIG`` runs one benchmark config (a recipe with expected metrics) through the runner and
checks its result, ``bench --list`` lists the configs with their last result, ``bench --report`` writes the
benchmark report (BENCHMARKS.md) from the configs and results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgeon.errors import SurgeonError

from .common import DebugOpt, JsonOpt, check_output_file, markdown_table

__all__ = ["bench_cmd", "CONFIGS_DIR", "RESULTS_DIR"]

CONFIGS_DIR = "benchmarks/configs"
RESULTS_DIR = "benchmarks/results"
DEFAULT_REPORT = "BENCHMARKS.md"


def bench_cmd(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Argument(
        help=f"A benchmark config: a YAML file or the NAME of {CONFIGS_DIR}/NAME.yaml.")] = None,
    list_configs: Annotated[bool, typer.Option(
        "--list", help="List the benchmark configs: name, machine, title and the status of the last result.")] = False,
    report: Annotated[bool, typer.Option(
        "--report", help=f"Write the benchmark report from {CONFIGS_DIR} and {RESULTS_DIR}.")] = False,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help=f"The report file of --report (default {DEFAULT_REPORT}).")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="torch device, over the config's compute.device (e.g. cuda).")] = None,
    json_out: JsonOpt = None,
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", help="Processes per shot (data-parallel curvature), over the config's compute.nproc.",
        min=1)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Checkpoint folder after every step; a later call with it resumes the run.")] = None,
    stop_after: Annotated[Optional[int], typer.Option(
        "--stop-after", help="Stop after N steps (with --checkpoint: split a long run over several calls; a "
                             "stopped run writes no result).", min=1)] = None,
    results_dir: Annotated[Path, typer.Option(
        "--results-dir", help="Where results are written and read.")] = Path(RESULTS_DIR),
    debug: DebugOpt = False,
) -> None:
    """Run a benchmark config and check its metrics against the expected ones (exit 1 if one misses its
    tolerance); or list the configs (--list), or write the report (--report). key=value arguments after the options
    override the config's recipe (e.g. model=models/smollm2-135m)."""
    modes = [name for name, on in (("CONFIG", config is not None), ("--list", list_configs), ("--report", report))
             if on]
    if len(modes) != 1:
        raise SurgeonError("give a benchmark CONFIG, --list or --report (exactly one)")
    if output is not None and not report:
        raise SurgeonError("--output is the file of --report")
    run_options = {"--device": device, "--json": json_out, "--nproc": nproc, "--checkpoint": checkpoint,
                   "--stop-after": stop_after}
    if config is None and any(v is not None for v in run_options.values()):
        used = ", ".join(k for k, v in run_options.items() if v is not None)
        raise SurgeonError(f"{used} apply to running a benchmark CONFIG")
    if list_configs:
        from surgeon.bench import list_configs as configs

        rows = [{k: c.get(k, "") for k in ("name", "machine", "title", "status")} for c in configs(CONFIGS_DIR, results_dir)]
        print(markdown_table(rows, ["name", "machine", "title", "status"]), end="")
        return
    if report:
        from surgeon.benchmark_report import write_report

        if not Path(CONFIGS_DIR).is_dir():
            raise SurgeonError(f"no benchmark configs folder {CONFIGS_DIR} (run from the repository root)")

        out = check_output_file(output or Path(DEFAULT_REPORT))
        print(f"wrote {write_report(CONFIGS_DIR, results_dir, out)}")
        return
    json_out = check_output_file(json_out)
    from surgeon.bench import run_bench

    result = run_bench(_config_path(config), device=device, json_path=json_out, nproc=nproc, checkpoint=checkpoint,
                       stop_after=stop_after, results_dir=results_dir, overrides=list(ctx.args))
    if "metrics" not in result:  # stopped before the end: the checkpoint holds the run
        print(f"stopped after {result.get('stopped_after')} step(s); rerun with --checkpoint {checkpoint} to go on")
        return
    print(markdown_table(_metric_rows(result), ["metric", "measured", "expected", "tolerance", "check"]), end="")
    print(f"{result['name']}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s "
          f"(result: {Path(results_dir) / result['name']}.json)")
    if not result["passed"]:
        for failure in result.get("failures", []):
            print(f"  {failure}")
        raise typer.Exit(1)


def _config_path(config: str) -> Path:
    """A config file, or the NAME of one in the configs folder."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    named = Path(CONFIGS_DIR) / f"{config}.yaml"
    if named.is_file():
        return named
    raise SurgeonError(f"benchmark config not found: {config} (a YAML file or a NAME of {CONFIGS_DIR}/NAME.yaml; "
                       "see surgeon bench --list)")


def _metric_rows(result: dict) -> list[dict]:
    """Every measured or expected metric: measured, expected, tolerance and whether it is within it."""
    metrics, expect, tolerance = result.get("metrics", {}), result.get("expect", {}), result.get("tolerance", 0.0)
    missed = {f.split(":", 1)[0] for f in result.get("failures", [])}
    rows = []
    for key in list(expect) + [k for k in metrics if k not in expect]:
        tol = tolerance.get(key) if isinstance(tolerance, dict) else tolerance
        rows.append({"metric": key, "measured": _number(metrics.get(key)), "expected": _number(expect.get(key)),
                     "tolerance": _number(tol) if key in expect else None,
                     "check": ("MISSED" if key in missed else "ok") if key in expect else ""})
    return rows


def _number(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value
