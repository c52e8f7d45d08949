"""The ``sweep`` flow: several methods / structures / targets from one recipe, compared in one table and plot.

A sweep recipe is a prune recipe plus a ``sweep:`` list of override mappings, one per variant::

    model: smollm2-135m
    eval_data: builtin:stdlib-docs
    sweep:
      - {method: llm-surgeon, target_size: 0.9}
      - {method: magnitude, target_size: 0.9}

Every variant is validated before anything runs, and runs as a ``prune`` subflow (its own MLflow run, nested under
the sweep's run). The shared steps are cache hits after the first variant (model, calibration, dense ppl), and so
are shots that an earlier run of the same variant already computed.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger

from flows.prune import prune_flow, resolve_config
from surgeon.config import PruneConfig, parse_overrides
from surgeon.errors import SurgeonError
from tasks import plots, reporting, tracking

__all__ = ["sweep_flow", "sweep_configs", "variant_label"]


def variant_label(cfg: PruneConfig) -> str:
    return f"{cfg.method}-{cfg.structure.replace(':', 'of')}-{cfg.final_target:g}"


def sweep_configs(config: dict | str, overrides: list[str] | None = None) -> tuple[dict, list[PruneConfig]]:
    """(base recipe without ``sweep``, one validated config per variant); errors name the variant."""
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if not path.is_file():
            raise SurgeonError(f"recipe not found: {path}")
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    base = dict(config)
    variants = base.pop("sweep", None)
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise SurgeonError("a sweep recipe needs 'sweep:', a non-empty list of key: value mappings (one per variant)")
    base.update(parse_overrides(overrides or []))
    configs = []
    for i, variant in enumerate(variants):
        try:
            cfg = resolve_config({**base, **variant})
        except SurgeonError as exc:
            raise SurgeonError(f"sweep[{i}]: {exc}") from exc
        if base.get("output"):
            cfg = cfg.model_copy(update={"output": str(Path(base["output"]) / variant_label(cfg))})
        configs.append(cfg)
    labels = [variant_label(c) for c in configs]
    if len(set(labels)) != len(labels):
        raise SurgeonError(f"sweep variants must differ in method, structure or target size: {labels}")
    return base, configs


@flow(name="sweep")
def sweep_flow(config: dict | str, overrides: list[str] | None = None) -> dict:
    """Run every variant of a sweep recipe as a ``prune`` subflow; compare them in a table and a plot."""
    log = get_run_logger()
    base, configs = sweep_configs(config, overrides)
    first = configs[0]
    name = tracking.registered_name(first.model, first.model_name)
    out_dir = Path(base["output"]) if base.get("output") else \
        tracking.surgeon_home() / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log.info("sweep of %d variants: %s", len(configs), ", ".join(variant_label(c) for c in configs))

    with tracking.start_run(f"sweep {name} ({len(configs)} variants)", experiment=first.experiment,
                            params={"variants": [variant_label(c) for c in configs], "base": base},
                            tags={**reporting.flow_run_tags(), "sweep": "true"}) as run:
        results = [prune_flow(cfg, parent_run_id=run.run_id) for cfg in configs]

        rows = [{"variant": variant_label(c), "method": c.method, "structure": c.structure,
                 "target_size": c.final_target, "size": r["achieved_size"], "ppl": r["ppl"],
                 "dense_ppl": r["dense_ppl"], "ppl_ratio": r["ppl_ratio"], "cached_shots": len(r["cached_shots"]),
                 "seconds": round(r["seconds"], 1), "version": r["registered_version"]}
                for c, r in zip(configs, results)]
        dense_ppl = next((r["dense_ppl"] for r in results if r["dense_ppl"]), None)
        series: dict[str, list[tuple[float, float]]] = {}
        for c, r in zip(configs, results):  # each line starts at the dense model (size 1.0)
            points = series.setdefault(f"{c.method} {c.structure}", [(1.0, dense_ppl)] if dense_ppl else [])
            points.extend((s["size"], s["ppl"]) for s in r["rows"] if s["ppl"] is not None)
        plots.write_comparison(out_dir, rows, series, dense_ppl)
        tracking.log_directory(run.run_id, out_dir)
        reporting.sweep_summary(reporting.artifact_key("sweep", name), rows=rows, run_url=run.url)
    log.info("comparison written to %s\n%s", out_dir, plots.markdown_table(rows))
    return {"rows": rows, "comparison_dir": str(out_dir), "run_id": run.run_id, "run_url": run.url,
            "results": results}
