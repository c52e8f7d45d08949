"""What a run shows in the Prefect UI: a progress bar over shots, a markdown summary, a table, a link to MLflow.

Artifact keys are lowercase letters, digits and dashes (Prefect's rule); they are derived from the registry name so
each model's history is one artifact series.
"""

from __future__ import annotations

import re

from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.runtime import flow_run

from .plots import markdown_table

__all__ = ["artifact_key", "flow_run_tags", "Progress", "prune_summary", "sweep_summary", "promotion_summary",
           "zeroshot_rows", "zeroshot_table"]


def artifact_key(*parts: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")[:100]


def flow_run_tags() -> dict[str, str]:
    """Tags that lead from an MLflow run back to its Prefect flow run."""
    tags = {"prefect_flow_run_id": flow_run.get_id(), "prefect_flow_run_name": flow_run.get_name()}
    return {k: str(v) for k, v in tags.items() if v}


class Progress:
    """A progress artifact over ``total`` steps, updated in place."""

    def __init__(self, key: str, total: int, what: str):
        self.total, self.what = total, what
        self.id = create_progress_artifact(0.0, key=key, description=f"{what}: 0/{total}")

    def update(self, done: int) -> None:
        update_progress_artifact(self.id, 100.0 * done / self.total, description=f"{self.what}: {done}/{self.total}")


def prune_summary(key: str, *, title: str, rows: list[dict], summary: dict, run_url: str) -> None:
    lines = [f"# {title}", "",
             f"- source model `{summary['model']}` (content `{summary['source_model_hash'][:12]}`)",
             f"- {summary['method']}, {summary['structure']}, target size {summary['target_size']:.4g}, "
             f"{summary['shots']} shot(s), achieved size {summary['achieved_size']:.4f}"]
    if summary.get("ppl") is not None:
        dense = summary.get("dense_ppl")
        lines.append(f"- perplexity **{summary['ppl']:.3f}**" + (f" (dense {dense:.3f}, x{summary['ppl_ratio']:.3f})"
                                                                  if dense else ""))
    cached = [r["shot"] for r in rows if r.get("cached")]
    if cached:
        lines.append(f"- shots served from the cache: {', '.join(map(str, cached))}")
    lines.append(f"- output `{summary['output']}`")
    if summary.get("registered_version"):
        reused = " (the same weights as before: that version is reused)" if summary.get("registration") == "reused" \
            else ""
        lines.append(f"- registered as `{summary['model_name']}` version {summary['registered_version']}{reused}")
    lines += [f"- MLflow run: [{run_url}]({run_url})", "", markdown_table(rows)]
    create_markdown_artifact("\n".join(lines), key=key, description=title)
    create_table_artifact(rows, key=f"{key}-shots", description="per-shot size, perplexity and seconds")
    create_link_artifact(run_url, link_text="MLflow run", key=f"{key}-mlflow", description="MLflow run of this flow")


ZEROSHOT_METRICS = ("acc", "acc_norm", "perplexity")


def zeroshot_rows(dense: dict | None, pruned: dict | None) -> list[dict]:
    """One row per task and metric: dense, pruned and the change (results of the ``zeroshot`` task)."""
    rows = []
    tasks = list(dict.fromkeys([*(dense or {}).get("tasks", {}), *(pruned or {}).get("tasks", {})]))
    for task in tasks:
        d = (dense or {}).get("tasks", {}).get(task, {})
        p = (pruned or {}).get("tasks", {}).get(task, {})
        for metric in ZEROSHOT_METRICS:
            if metric in d or metric in p:
                a, b = d.get(metric), p.get(metric)
                rows.append({"task": task, "metric": metric, "dense": a, "pruned": b,
                             "change": b - a if a is not None and b is not None else None,
                             "documents": p.get("n", d.get("n"))})
    avg_d, avg_p = (dense or {}).get("average"), (pruned or {}).get("average")
    if avg_d is not None or avg_p is not None:
        rows.append({"task": "average", "metric": "acc", "dense": avg_d, "pruned": avg_p,
                     "change": avg_p - avg_d if avg_d is not None and avg_p is not None else None,
                     "documents": None})
    return rows


def zeroshot_table(key: str, *, dense: dict | None, pruned: dict | None) -> list[dict]:
    """A Prefect table artifact of zero-shot accuracy, dense vs pruned, per task and metric."""
    rows = zeroshot_rows(dense, pruned)
    if rows:
        create_table_artifact(rows, key=key, description="zero-shot accuracy (lm-eval): dense vs pruned")
    return rows


def sweep_summary(key: str, *, rows: list[dict], run_url: str) -> None:
    md = f"# Sweep ({len(rows)} variants)\n\nMLflow run: [{run_url}]({run_url})\n\n{markdown_table(rows)}"
    create_markdown_artifact(md, key=key, description="sweep comparison")
    create_table_artifact(rows, key=f"{key}-table", description="sweep comparison")
    create_link_artifact(run_url, link_text="MLflow sweep run", key=f"{key}-mlflow")


def promotion_summary(key: str, *, name: str, version: str, passed: bool, reason: str, alias: str) -> None:
    verdict = f"moved alias `{alias}` to version {version}" if passed else f"alias `{alias}` not moved"
    create_markdown_artifact(f"# Promote {name} v{version}\n\n**{'passed' if passed else 'refused'}**: {reason}\n\n"
                             f"{verdict}\n", key=key, description=f"promotion gate of {name} v{version}")
