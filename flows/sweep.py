"""The ``sweep`` flow: several methods / structures / targets from one recipe, compared in one table and plot.

A sweep recipe is a prune recipe plus a ``sweep:`` list of override mappings, one per variant::

    model: smollm2-135m
    eval_data: builtin:stdlib-docs
    sweep:
      - {method: llm-surgeon, target_size: 0.9}
      - {method: magnitude, target_size: 0.9}

Every variant is validated before anything runs, and runs as a ``prune`` subflow (its own MLflow run, nested under
the sweep's run) inside a ``sweep-run`` task, so the flow's task runner decides where the runs go. By default the
runs go one after the other (a one-thread task runner): the shared steps are then cache hits after the first variant
(model, calibration, dense ppl), and so are shots that an earlier run of the same variant already computed. With
``dask=...`` (:func:`run_sweep`, ``surgeon sweep --dask``) Prefect's ``DaskTaskRunner`` (prefect-dask) fans the
runs out over Dask workers, one run per worker at a time:

- ``dask="local"`` / ``"local:N"``: a temporary ``distributed.LocalCluster`` of N single-threaded worker processes
  (N = the number of visible GPUs for a CUDA recipe, else 2). A run on device ``cuda`` in local worker i uses GPU i.
- ``dask="tcp://HOST:8786"``: an existing Dask scheduler, e.g. one ``dask worker`` per GPU started with
  ``CUDA_VISIBLE_DEVICES=i dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1`` on every machine. The workers
  need this project installed and the same ``SURGEON_HOME``/``MLFLOW_TRACKING_URI``/``SURGEON_CACHE`` (a shared
  file system or a tracking server).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.prune import prune_flow
from surgeon.config import PruneConfig, build_config, merge, parse_overrides, read_yaml
from surgeon.errors import SurgeonError
from tasks import plots, reporting, tracking

__all__ = ["sweep_flow", "sweep_configs", "variant_label", "run_sweep", "dask_task_runner"]


def variant_label(cfg: PruneConfig) -> str:
    return f"{cfg.method.name}-{cfg.method.structure.replace(':', 'of')}-{cfg.final_target:g}"


def sweep_configs(config: dict | str, overrides: list[str] | None = None) -> tuple[dict, list[PruneConfig]]:
    """(base recipe without ``sweep``, one validated config per variant); errors name the variant."""
    if isinstance(config, (str, Path)):
        config = read_yaml(config)
    base = dict(config)
    variants = base.pop("sweep", None)
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise SurgeonError("a sweep recipe needs 'sweep:', a non-empty list of key: value mappings (one per variant)")
    base = merge(base, parse_overrides(overrides or []))
    base_output = base.get("output", {}).get("path")
    configs = []
    for i, variant in enumerate(variants):
        try:
            cfg = build_config(merge(base, variant))
        except SurgeonError as exc:
            raise SurgeonError(f"sweep[{i}]: {exc}") from exc
        if base_output:
            cfg.output.path = str(Path(base_output) / variant_label(cfg))
        configs.append(cfg)
    labels = [variant_label(c) for c in configs]
    if len(set(labels)) != len(labels):
        raise SurgeonError(f"sweep variants must differ in method, structure or target size: {labels}")
    return base, configs


def _dask_worker() -> str | int | None:
    """The name of the Dask worker running this code (LocalCluster: 0, 1, ...), None outside Dask."""
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):
        return None


def _worker_device(cfg: PruneConfig, worker: str | int | None) -> PruneConfig:
    """A run on device ``cuda`` inside local Dask worker i goes to GPU i (of the GPUs visible to the worker)."""
    if cfg.compute.device != "cuda" or not isinstance(worker, int):
        return cfg
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.compute.device = f"cuda:{worker % count}"
    return cfg


@task(name="sweep-run", cache_policy=NO_CACHE)
def sweep_run(config: PruneConfig, parent_run_id: str) -> dict:
    """One variant: the ``prune`` flow as a subflow of this task (the flow's task runner places the task).
    The result carries ``worker``: the Dask worker that ran it (None without Dask)."""
    # imported here: a Dask worker receives this task by value (cloudpickle), and a prune_flow captured from this
    # module's globals would arrive without the globals its parameter annotations need
    from flows.prune import prune_flow as prune

    worker = _dask_worker()
    return {**prune(_worker_device(config, worker), parent_run_id=parent_run_id), "worker": worker}


def dask_task_runner(spec: str, *, device: str = "cpu"):
    """A ``DaskTaskRunner`` for ``spec``: ``local`` / ``local:N`` (a temporary LocalCluster of N single-threaded
    worker processes; N defaults to the visible GPUs for a CUDA ``device``, else 2) or a scheduler address."""
    from prefect_dask import DaskTaskRunner

    spec = spec.strip()
    if spec == "local" or spec.startswith("local:"):
        count = spec.partition(":")[2]
        if count and not (count.isdigit() and int(count) >= 1):
            raise SurgeonError(f"--dask local:N needs a positive number of workers, got '{spec}'")
        if count:
            n = int(count)
        else:
            import torch

            n = torch.cuda.device_count() if device.startswith("cuda") and torch.cuda.is_available() else 2
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if "://" not in spec and ":" not in spec:
        raise SurgeonError(f"--dask must be 'local', 'local:N' or a scheduler address such as tcp://HOST:8786, "
                           f"got '{spec}'")
    return DaskTaskRunner(address=spec)


def run_sweep(config: dict | str, overrides: list[str] | None = None, *, dask: str | None = None) -> dict:
    """Run the sweep flow; ``dask`` (see :func:`dask_task_runner`) fans its runs out over Dask workers."""
    if dask is None:
        return sweep_flow(config, overrides)
    _, configs = sweep_configs(config, overrides)
    runner = dask_task_runner(dask, device=configs[0].compute.device)
    return sweep_flow.with_options(task_runner=runner)(config, overrides)


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=1))
def sweep_flow(config: dict | str, overrides: list[str] | None = None) -> dict:
    """Run every variant of a sweep recipe as a ``prune`` subflow; compare them in a table and a plot."""
    log = get_run_logger()
    base, configs = sweep_configs(config, overrides)
    first = configs[0]
    name = tracking.registered_name(first.model, first.output.model_name)
    base_output = base.get("output", {}).get("path")
    out_dir = Path(base_output) if base_output else \
        tracking.surgeon_home() / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log.info("sweep of %d variants: %s", len(configs), ", ".join(variant_label(c) for c in configs))

    with tracking.start_run(f"sweep {name} ({len(configs)} variants)", experiment=first.output.experiment,
                            params={"variants": [variant_label(c) for c in configs], "base": base},
                            tags={**reporting.flow_run_tags(), "sweep": "true"}) as run:
        futures = [sweep_run.submit(cfg, run.run_id) for cfg in configs]
        results = [f.result() for f in futures]

        rows = [{"variant": variant_label(c), "method": c.method.name, "structure": c.method.structure,
                 "target_size": c.final_target, "size": r["achieved_size"], "ppl": r["ppl"],
                 "dense_ppl": r["dense_ppl"], "ppl_ratio": r["ppl_ratio"], "cached_shots": len(r["cached_shots"]),
                 "seconds": round(r["seconds"], 1), "version": r["registered_version"]}
                for c, r in zip(configs, results)]
        if any(c.eval.zeroshot_tasks for c in configs):
            for row, r in zip(rows, results):
                row["acc_avg"] = (r.get("zeroshot") or {}).get("average")
                row["dense_acc_avg"] = (r.get("dense_zeroshot") or {}).get("average")
        dense_ppl = next((r["dense_ppl"] for r in results if r["dense_ppl"]), None)
        series: dict[str, list[tuple[float, float]]] = {}
        for c, r in zip(configs, results):  # each line starts at the dense model (size 1.0)
            points = series.setdefault(f"{c.method.name} {c.method.structure}", [(1.0, dense_ppl)] if dense_ppl else [])
            points.extend((s["size"], s["ppl"]) for s in r["rows"] if s["ppl"] is not None)
        plots.write_comparison(out_dir, rows, series, dense_ppl)
        plots.write_report(  # report.md: methods x sizes (ppl, zero-shot), acc_vs_size.png, allocation heatmaps
            out_dir, title=f"Sweep {name} ({len(configs)} variants)", dense_ppl=dense_ppl,
            dense_zeroshot=next((r["dense_zeroshot"] for r in results if r.get("dense_zeroshot")), None),
            variants=[{"label": variant_label(c), "method": c.method.name, "structure": c.method.structure,
                       "target_size": c.final_target, "size": r["achieved_size"], "ppl": r["ppl"],
                       "zeroshot": r.get("zeroshot"), "layer_sizes": r.get("layer_sizes") or {},
                       "points": [(s["size"], s["ppl"], s.get("acc_avg")) for s in r["rows"]]}
                      for c, r in zip(configs, results)])
        tracking.log_directory(run.run_id, out_dir)
        reporting.sweep_summary(reporting.artifact_key("sweep", name), rows=rows, run_url=run.url)
    log.info("comparison written to %s\n%s", out_dir, plots.markdown_table(rows))
    return {"rows": rows, "comparison_dir": str(out_dir), "run_id": run.run_id, "run_url": run.url,
            "results": results}
