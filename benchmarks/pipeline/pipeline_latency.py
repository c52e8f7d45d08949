"""Pipeline latency on this machine, with a fresh SURGEON_HOME and SURGEON_CACHE under --work:

1. the demo recipe (deployments/recipes/small-cpu.yaml on SmolLM2) twice through ``surgeon prune``: the first run
   computes and registers, the second is served from the cache and reuses the registered version;
2. the registered version through MLflow's own API: ``mlflow.transformers.load_model("models:/NAME/V")`` and one
   greedy generation of 16 tokens, in a fresh process (time to import, load, generate);
3. ``surgeon promote`` with no Prefect server (a temporary one is started), then with the services of
   deployments/start_services.sh running on the same home (the command finds them), then
   ``deployments/run_deployment.sh promote/promote model_name=NAME version=V`` on the worker.

Every time is a wall-clock time of a subprocess, measured once; the JSON says the machine and its load.
``--demo-json RUN1 RUN2 --home H --cache C`` takes steps 1's results from two earlier ``surgeon prune --json`` runs
of the demo recipe on that home and cache (their wall times given with ``--demo-wall``) instead of running them.

    python benchmarks/pipeline/pipeline_latency.py --work /tmp/latency --json benchmarks/pipeline/latency-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

LOAD = """
import time, sys
t0 = time.perf_counter()
import mlflow, surgeon.materialized_export
t_import = time.perf_counter() - t0
mlflow.set_tracking_uri(sys.argv[1])
t0 = time.perf_counter()
pipe = mlflow.transformers.load_model(sys.argv[2])
t_load = time.perf_counter() - t0
t0 = time.perf_counter()
text = pipe("The capital of France is", max_new_tokens=16, do_sample=False)[0]["generated_text"]
t_gen = time.perf_counter() - t0
import json
print(json.dumps({"import_s": t_import, "load_s": t_load, "generate_16_tokens_s": t_gen, "text": text,
                  "model_class": type(pipe.model).__name__}))
"""


def timed(cmd: list, env: dict, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - t0, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="fresh folder for the home, cache and logs")
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--home", type=Path, help="SURGEON_HOME of earlier demo runs (default: WORK/home)")
    ap.add_argument("--cache", type=Path, help="SURGEON_CACHE of earlier demo runs (default: WORK/cache)")
    ap.add_argument("--demo-json", type=Path, nargs=2, help="the --json files of two earlier demo runs")
    ap.add_argument("--demo-wall", type=float, nargs=2, help="their wall-clock seconds")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=False)
    home, cache = (args.home or work / "home").resolve(), (args.cache or work / "cache").resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(SURGEON_HOME=str(home), SURGEON_CACHE=str(cache), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = {"machine": {"cpus_affinity": len(os.sched_getaffinity(0)), "processor": platform.processor(),
                       "loadavg_start": os.getloadavg()},
           "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "recipe": "deployments/recipes/small-cpu.yaml", "model": args.model,
           "note": "SmolLM2-135M weights are Q4_1 4-bit de-quantized"}
    prune = [BIN / "surgeon", "prune", "--config", "deployments/recipes/small-cpu.yaml", f"model={args.model}",
             "--output", work / "pruned"]
    runs = []
    for i in (1, 2):
        if args.demo_json:
            s, rc, res = args.demo_wall[i - 1], 0, json.loads(args.demo_json[i - 1].read_text())
        else:
            s, rc = timed([*prune, "--json", work / f"prune{i}.json"], env, work / f"prune{i}.log")
            res = json.loads((work / f"prune{i}.json").read_text()) if rc == 0 else {}
        runs.append({"wall_s": s, "rc": rc, "cached_shots": res.get("cached_shots"), "flow_s": res.get("seconds"),
                     "registered_version": res.get("registered_version"), "registration": res.get("registration")})
    out["demo_recipe_runs"] = runs
    name, version = "smollm2-135m", runs[0]["registered_version"]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    load = subprocess.run([sys.executable, "-c", LOAD, uri, f"models:/{name}/{version}"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    out["mlflow_transformers_load"] = json.loads(load.stdout.strip().splitlines()[-1]) if load.returncode == 0 \
        else {"error": load.stderr[-2000:]}
    promote = [BIN / "surgeon", "promote", "--model-name", name, "--version", version]
    s, rc = timed(promote, env, work / "promote-temporary.log")
    out["promote_temporary_server"] = {"wall_s": s, "rc": rc}
    s, rc = timed([ROOT / "deployments" / "start_services.sh"], env, work / "services-start.log")
    out["services_start"] = {"wall_s": s, "rc": rc}
    try:
        s, rc = timed(promote, env, work / "promote-running.log")
        out["promote_running_server"] = {"wall_s": s, "rc": rc}
        s, rc = timed([ROOT / "deployments" / "run_deployment.sh", "promote/promote", f"model_name={name}",
                       f"version={version}"], env, work / "deploy-run-promote.log")
        out["deploy_run_promote"] = {"wall_s": s, "rc": rc,
                                     "output": (work / "deploy-run-promote.log").read_text()[-3000:]}
    finally:
        timed([ROOT / "deployments" / "stop_services.sh"], env, work / "services-stop.log")
    out["machine"]["loadavg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
