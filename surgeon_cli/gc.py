"""``surgeon gc``: free the disk that nothing registered needs: the pipeline cache (shot and fine-tuning
checkpoints, cached task results, zero-shot result files) and the ``model/`` artifacts of MLflow runs that are no
registered version's source (a deleted version's weights, runs from before a version was reused)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, JsonOpt, pipeline_env, write_json

__all__ = ["gc_cmd", "collect", "remove", "CACHE_PARTS"]

# under $SURGEON_CACHE/pipeline: checkpoints, the tasks' records, zero-shot files, and Prefect result files of
# earlier versions; locks/ stays (a held lock belongs to a running writer)
CACHE_PARTS = ("shots", "finetune", "records", "zeroshot", "results")


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _age_s(path: Path) -> float:
    """Seconds since anything in ``path`` last changed (a folder: its newest entry)."""
    newest = path.stat().st_mtime
    if path.is_dir():
        newest = max([newest, *(p.stat().st_mtime for p in path.rglob("*"))])
    return time.time() - newest


def collect(min_age_s: float = 600.0) -> dict:
    """What ``surgeon gc`` would remove: ``{"cache": [...], "mlflow": [...], "kept": [...], "busy": [...]}``, each
    entry ``{"path", "bytes", "what"}``. Entries changed in the last ``min_age_s`` seconds may belong to a running
    flow and are listed under ``busy``, not removed; registered versions' artifacts are under ``kept``."""
    from surgeon.utils import cache_dir
    from tasks import tracking

    out: dict[str, list] = {"cache": [], "mlflow": [], "kept": [], "busy": []}
    root = cache_dir("pipeline")
    for part in CACHE_PARTS:
        folder = root / part
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            item = {"path": str(entry), "bytes": _bytes(entry), "what": f"cache/{part}"}
            out["busy" if _age_s(entry) < min_age_s else "cache"].append(item)
    found = tracking.model_artifacts()
    for e in found["unneeded"]:
        path = Path(e["path"])
        item = {"path": e["path"], "bytes": _bytes(path), "what": f"mlflow run {e['run_id']} model"}
        out["busy" if _age_s(path) < min_age_s else "mlflow"].append(item)
    for e in found["needed"]:
        out["kept"].append({"path": e["path"], "bytes": _bytes(Path(e["path"])),
                            "what": f"mlflow run {e['run_id']} model (a registered version)"})
    return out


def remove(found: dict) -> int:
    """Delete the ``cache`` and ``mlflow`` entries of :func:`collect`; returns the bytes freed."""
    freed = 0
    for item in found["cache"] + found["mlflow"]:
        path = Path(item["path"])
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        freed += item["bytes"]
    return freed


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def gc_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed and how much it would "
                                          "free; remove nothing.")] = False,
    min_age: Annotated[float, typer.Option(
        "--min-age", help="Leave entries changed in the last MINUTES alone (a running flow may be using them).",
        min=0)] = 10.0,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Remove cached shots, checkpoints and results, and MLflow model artifacts no registered version needs."""
    uri = pipeline_env()
    found = collect(min_age_s=60.0 * min_age)
    doomed = found["cache"] + found["mlflow"]
    for item in doomed:
        print(f"{'would remove' if dry_run else 'removing'} {item['what']}: {item['path']} ({_mb(item['bytes'])})")
    for item in found["busy"]:
        print(f"leaving {item['what']}: {item['path']} (changed in the last {min_age:g} min)")
    total = sum(i["bytes"] for i in doomed)
    kept = sum(i["bytes"] for i in found["kept"])
    freed = 0 if dry_run else remove(found)
    verb = "would free" if dry_run else "freed"
    print(f"{verb} {_mb(total if dry_run else freed)} ({len(doomed)} entries: {len(found['cache'])} cache, "
          f"{len(found['mlflow'])} MLflow model artifacts); kept {len(found['kept'])} registered versions' "
          f"artifacts ({_mb(kept)}); MLflow {uri}")
    if json_out is not None:
        write_json(json_out, {**found, "dry_run": dry_run, "bytes": total, "freed": freed, "tracking_uri": uri})
