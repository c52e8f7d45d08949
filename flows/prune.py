"""The ``prune`` flow: one recipe in, a pruned, evaluated, tracked and registered model out.

    load model -> calibration windows -> evaluate dense (perplexity; zero-shot accuracy if eval.zeroshot_tasks)
    for each step of the plan:  prune the step's shot -> fine-tune (step.finetune_steps; pruned weights stay 0)
                                -> evaluate (step.evaluate)
    export -> materialize (output.materialize) -> structure report (structured / coupled) -> register (a version
    with the same weights is reused)

Each shot is its own cached task whose checkpoint is the resume point; see ``tasks/steps.py``.

Run it: ``surgeon prune --config deployments/recipes/tiny-test.yaml`` or, from Python,
``prune_flow("deployments/recipes/small-cpu.yaml", overrides=["shots=3"])``.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from surgeon import outputs
from surgeon.config import PruneConfig, build_config, load_recipe, merge, parse_overrides
from tasks import reporting, steps, tracking

__all__ = ["prune_flow", "resolve_config"]


def resolve_config(config: PruneConfig | dict | str, overrides: list[str] | None = None) -> PruneConfig:
    """A recipe path, a dict or a config, with ``key=value`` overrides on top, validated into one config."""
    if isinstance(config, (str, Path)):
        return load_recipe(config, overrides or [])
    data = config.model_dump() if isinstance(config, PruneConfig) else dict(config)
    return build_config(merge(data, parse_overrides(overrides or [])))


def default_output(cfg: PruneConfig, name: str) -> str:
    m = cfg.method
    tag = f"{name}-{m.name}-{m.structure.replace(':', 'of')}-{cfg.final_target:g}-{cfg.config_hash()[:8]}"
    return str(tracking.surgeon_home() / "outputs" / tag)


def _cached_checkpoint(task, *args) -> tuple[dict, bool]:
    """Run a checkpointing task (it verifies its cache entry and checkpoint itself); whether it was a cache hit."""
    out = task(*args)
    return out, out["cached"]


def _row(shot: int, report: dict, evaluation: dict | None, cached: bool) -> dict:
    return {"shot": shot, "target_size": round(report["target_size"], 6), "size": round(report["achieved_size"], 6),
            "ppl": evaluation["ppl"] if evaluation else None, "estimated_loss": report["estimated_loss"],
            "seconds": round(sum(report["seconds"].values()), 2), "cached": cached}


@flow(name="prune")
def prune_flow(config: PruneConfig | dict | str, overrides: list[str] | None = None,
               parent_run_id: str | None = None) -> dict:
    """Prune one model with one recipe (a recipe file path, a dict or a ``PruneConfig``; ``key=value`` overrides)."""
    t0 = time.perf_counter()
    log = get_run_logger()
    cfg = resolve_config(config, overrides)
    prune_shot, finetune, evaluate = steps.prune_shot, steps.finetune, steps.evaluate
    zeroshot, structure_report = steps.zeroshot, steps.structure_report
    name = tracking.registered_name(cfg.model, cfg.output.model_name)
    key = reporting.artifact_key("prune", name)
    plan = cfg.plan()
    m, zs_tasks = cfg.method, cfg.eval.zeroshot_tasks
    log.info("%s: %s %s to size %.4g in %d shot(s): %s", name, m.name, m.structure, cfg.final_target,
             len(plan), ", ".join(f"{s.target_size:.4f}" for s in plan))

    # the output policy (no silent overwrite) before any work; one writer per output folder for the whole run
    output = cfg.output.path or default_output(cfg, name)
    outputs.check_output(output, config_hash=cfg.config_hash(), overwrite=cfg.output.overwrite, sources=[cfg.model])
    with outputs.output_lock(output), \
            tracking.start_run(f"{name} {m.name} {m.structure} {cfg.final_target:g}", experiment=cfg.output.experiment,
                               params=cfg.flat(), parent_run_id=parent_run_id,
                               tags={**reporting.flow_run_tags(), "config_hash": cfg.config_hash()}) as run:
        log.info("MLflow run %s", run.url)
        model = steps.load_model(cfg)
        calibration = steps.build_calibration(cfg, model)
        eval_data = steps.build_eval(cfg, model)
        ft_data = steps.build_finetune(cfg, model, calibration) or calibration
        weights = steps.Weights(model.path, model.content_hash)
        dense = evaluate(cfg, weights, eval_data) if eval_data else None
        tracking.log_shot(run.run_id, 0, evaluation=dense)
        dense_zs = zeroshot(cfg, weights) if zs_tasks else None  # cached per model + task set
        tracking.log_zeroshot(run.run_id, 0, dense_zs, "dense")

        progress = reporting.Progress(f"{key}-progress", len(plan), "shots")
        rows, reports, ft_reports, zs = [], [], [], None
        for step in plan:
            out, cached = _cached_checkpoint(prune_shot, cfg, weights, calibration, step, model.content_hash)
            weights = out["weights"]
            if step.finetune_steps:  # mask-preserving fine-tuning: between shots, and longer after the last
                ft, _ = _cached_checkpoint(finetune, cfg, weights, ft_data, step)
                weights = ft["weights"]
                tracking.log_finetune(run.run_id, step.shot, ft["report"],
                                      first_step=sum(len(r["losses"]) for r in ft_reports))
                ft_reports.append(ft["report"])
            evaluation = evaluate(cfg, weights, eval_data) if step.evaluate and eval_data else None
            tracking.log_shot(run.run_id, step.shot, out["report"], evaluation)
            zs = zeroshot(cfg, weights) if zs_tasks and step.evaluate else None
            tracking.log_zeroshot(run.run_id, step.shot, zs, f"shot-{step.shot}")
            reports.append(out["report"])
            rows.append(_row(step.shot, out["report"], evaluation, cached))
            if zs_tasks:
                rows[-1]["acc_avg"] = zs["average"] if zs else None
            if step.finetune_steps:
                rows[-1]["finetune_loss"] = ft_reports[-1]["losses"][-1]
            progress.update(step.shot)

        final_ppl = rows[-1]["ppl"]
        dense_ppl = dense["ppl"] if dense else None
        summary = {
            "model": cfg.model, "model_name": name, "source_model_hash": model.content_hash,
            "config_hash": cfg.config_hash(), "calibration_id": calibration.data_id,
            "eval_data_id": eval_data.data_id if eval_data else None,
            "finetune_data_id": ft_data.data_id if ft_data is not calibration else None, "method": m.name,
            "structure": m.structure, "target_size": cfg.final_target, "shots": len(plan),
            "achieved_size": reports[-1]["achieved_size"], "dense_ppl": dense_ppl, "ppl": final_ppl,
            "ppl_ratio": final_ppl / dense_ppl if final_ppl and dense_ppl else None,
            "cached_shots": [r["shot"] for r in rows if r["cached"]], "rows": rows,
            "dense_zeroshot": dense_zs, "zeroshot": zs if zs_tasks else None,
            "layer_sizes": reports[-1]["layer_sizes"],
            "run_id": run.run_id, "run_url": run.url,
            "finetune_seconds": sum(r["seconds"] for r in ft_reports),
            # the step whose weights each fine-tuning kept (0: those from before it; None: no validation)
            "finetune_best_steps": [r.get("best_step") for r in ft_reports],
        }
        metrics = {k: summary[k] for k in ("ppl", "dense_ppl", "achieved_size")}
        summary["output"] = steps.export(cfg, weights, output, metrics, model)
        registered_dir = summary["output"]
        if cfg.output.materialize and m.structure in ("structured", "coupled"):
            summary["materialized"] = steps.materialize(summary["output"])
            registered_dir = summary["materialized"].get("output", registered_dir)
        if cfg.output.structure_report and m.structure in ("structured", "coupled"):
            report = structure_report(cfg, weights, summary["output"], model)  # cached per weights and settings
            if report is not None:
                tracking.log_structure_report(run.run_id, report)
            summary["structure_report"] = report
        tracking.log_outcome(run.run_id, recipe_yaml=cfg.to_yaml(), shot_reports=reports,
                             ppl_points=[(r["size"], r["ppl"]) for r in rows if r["ppl"] is not None]
                             + ([(1.0, dense_ppl)] if dense_ppl else []),
                             dense_ppl=dense_ppl, summary=summary, finetune_reports=ft_reports)
        summary["registered_version"] = summary["registration"] = None
        if cfg.output.register_model:
            tags = {"method": m.name, "structure": m.structure, "target_size": cfg.final_target,
                    "achieved_size": summary["achieved_size"], "dense_ppl": dense_ppl, "pruned_ppl": final_ppl,
                    "source_model_hash": model.content_hash, "config_hash": cfg.config_hash(),
                    "promote_max_ppl_ratio": cfg.output.promote_max_ppl_ratio,
                    "eval_data_id": summary["eval_data_id"],
                    "dense_zeroshot_acc": (dense_zs or {}).get("average"),
                    "pruned_zeroshot_acc": (summary["zeroshot"] or {}).get("average")}
            reg = steps.register(run.run_id, registered_dir, name, tags)
            summary["registered_version"] = reg["version"]
            summary["registration"] = "reused" if reg["reused"] else "new"
            summary["weights_sha256"] = reg["weights_sha256"]
        summary["seconds"] = time.perf_counter() - t0
        reporting.prune_summary(key, title=f"Prune {name}", rows=rows, summary=summary, run_url=run.url)
        if zs_tasks:
            reporting.zeroshot_table(f"{key}-zeroshot", dense=dense_zs, pruned=summary["zeroshot"])
    return summary
