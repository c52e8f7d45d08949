"""Orchestration overhead: one recipe through ``surgeon.pruning.prune_run`` (plain, in-process) and through the
Prefect ``prune`` flow (cold cache, then a second run to another output folder: cache hits), in one process.

    .venv/bin/python benchmarks/orchestration.py deployments/recipes/small-cpu.yaml model=models/smollm2-135m

Uses a fresh SURGEON_CACHE/SURGEON_HOME/PREFECT_HOME/MLflow store under a temp folder (``--keep DIR`` to choose it),
after warming the token cache, so both paths tokenize nothing. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--dir", default=None, help="work folder (default: a new temp folder)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="surgeon-orch-")).resolve()
    os.environ.update(SURGEON_CACHE=str(work / "cache"), SURGEON_HOME=str(work / "home"),
                      PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", HF_HUB_DISABLE_PROGRESS_BARS="1")
    (work / "prefect").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))

    from surgeon.config import load_recipe
    from surgeon.pruning import build_calibration, build_eval, prepare_model, prune_run

    def record(name: str, seconds: float, **extra) -> None:
        load = os.getloadavg()[0]
        print(json.dumps({"measure": name, "seconds": round(seconds, 1), "load1": round(load, 2), **extra}), flush=True)

    def compute(shots: list[dict], evals: list[dict]) -> float:
        """Seconds spent in the math: shot phases (curvature, costs, allocation, update) and evaluations."""
        return round(sum(sum(s["seconds"].values()) for s in shots) + sum(e["seconds"] for e in evals), 1)

    cfg = load_recipe(args.recipe, args.overrides)
    t0 = time.perf_counter()
    ref = prepare_model(cfg)
    build_calibration(cfg, ref.path), build_eval(cfg, ref.path)  # warm the token cache for both paths
    record("warm-up (hash model, tokenize calibration + eval text)", time.perf_counter() - t0)

    def direct(label: str, out: str) -> None:
        t0 = time.perf_counter()
        d = prune_run(cfg.model_copy(update={"output": str(work / out)}))
        evals = ([d["dense"]] if "dense" in d else []) + [s["eval"] for s in d["shots"] if "eval" in s]
        record(label, time.perf_counter() - t0, compute_seconds=compute(d["shots"], evals), ppl=d.get("ppl"),
               dense_ppl=d.get("dense", {}).get("ppl"), size=d["achieved_size"])

    from flows.prune import prune_flow
    from tasks import steps

    evaluations: list[dict] = []
    real_evaluate = steps.pruning.evaluate_dir

    def timed_evaluate(*a, **k):  # to split the flow's wall time into math and the rest
        evaluations.append(real_evaluate(*a, **k))
        return evaluations[-1]

    steps.pruning.evaluate_dir = timed_evaluate

    def flow(label: str, out: str) -> None:
        evaluations.clear()
        t0 = time.perf_counter()
        r = prune_flow(cfg.model_copy(update={"output": str(work / out)}))
        math = sum(row["seconds"] for row in r["rows"] if not row["cached"]) + sum(e["seconds"] for e in evaluations)
        record(label, time.perf_counter() - t0, flow_body_seconds=round(r["seconds"], 1),
               compute_seconds=round(math, 1), ppl=r["ppl"], dense_ppl=r["dense_ppl"],
               size=r["achieved_size"], cached_shots=r["cached_shots"], version=r["registered_version"])

    direct("prune_run (no Prefect, no MLflow)", "out-direct-1")
    flow("prune flow, cold cache", "out-flow-1")
    flow("prune flow again, other output (cache hits)", "out-flow-2")
    direct("prune_run again", "out-direct-2")
    print(json.dumps({"work": str(work)}))


if __name__ == "__main__":
    main()
