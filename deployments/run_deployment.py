"""Run a deployment on the running Prefect server, wait for it, and print a short summary: the flow run's final
state (with its message), its summary artifact (the ppl table and registered version of a prune run, the verdict of
a promotion), and where to look (Prefect flow run page, MLflow). Exit status 0 only if the run completed.

    python deployments/run_deployment.py FLOW/DEPLOYMENT [key=value ...]   (deployments/run_deployment.sh sets the
                                                                            environment and the FLOW/ prefix)

key=value pairs become the recipe ``overrides`` of prune/sweep runs and plain parameters of other flows, each value
read as JSON when it parses (``version=1`` is the number 1), else as the string.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


def parameters(name: str, pairs: list[str]) -> dict:
    for kv in pairs:
        if "=" not in kv:
            raise SystemExit(f"error: expected key=value, got {kv!r}")
    if name.startswith(("prune/", "sweep/")):
        return {"overrides": pairs} if pairs else {}
    out = {}
    for kv in pairs:
        key, value = kv.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def ui_base() -> str:
    api = os.environ.get("PREFECT_API_URL", "")
    return os.environ.get("PREFECT_UI_URL") or (api[: -len("/api")] if api.endswith("/api") else api)


async def run(name: str, params: dict, timeout_s: float) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments.flow_runs import arun_deployment

    flow_run = await arun_deployment(name, parameters=params, timeout=0)
    url = f"{ui_base()}/runs/flow-run/{flow_run.id}"
    print(f"flow run {flow_run.name} of {name}: {url}", flush=True)
    t0, last = time.monotonic(), None
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(flow_run.id)
            state = flow_run.state
            if state is not None and state.name != last:
                last = state.name
                print(f"  {time.monotonic() - t0:6.0f} s  {state.name}", flush=True)
            if state is not None and state.is_final():
                break
            if time.monotonic() - t0 > timeout_s:
                print(f"error: the flow run did not finish within {timeout_s:.0f} s (it goes on: {url})",
                      file=sys.stderr)
                return 1
            await asyncio.sleep(2)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    print()
    for artifact in artifacts:
        if artifact.type == "markdown" and artifact.data:
            print(str(artifact.data).strip())
            print()
    verdict = state.message or state.name
    if not verdict.startswith(state.name):
        verdict = f"{state.name}: {verdict}"
    print(f"{verdict} ({time.monotonic() - t0:.0f} s)")
    print(f"Prefect: {url}")
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        print(f"MLflow:  {os.environ['MLFLOW_TRACKING_URI']}")
    return 0 if state.is_completed() else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="FLOW/DEPLOYMENT, e.g. prune/tiny-test or promote/promote")
    parser.add_argument("pairs", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set (source the services' env.sh)", file=sys.stderr)
        return 2
    timeout_s = float(os.environ.get("SURGEON_RUN_TIMEOUT_S", "7200"))
    return asyncio.run(run(args.name, parameters(args.name, args.pairs), timeout_s))


if __name__ == "__main__":
    sys.exit(main())
