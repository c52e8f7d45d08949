#!/usr/bin/env bash
# Run a deployment on the services of deployments/start_services.sh, wait for it to finish and print a short summary
# (final state, the run's summary: ppl table and registered version, or the promotion verdict; where to look).
#   deployments/run_deployment.sh NAME [key=value ...]
# NAME is a prune deployment (tiny-test, small-cpu, paper-gpu) or FLOW/DEPLOYMENT (sweep/sweep-small-cpu);
# key=value pairs become the recipe `overrides` of prune/sweep runs (config fields: method.shots=3, eval.data=PATH)
# and plain parameters of other flows (promote/promote model_name=NAME version=V). Exit status 0 only if the flow run
# completed (a refused promotion ends Failed, named Refused).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${SURGEON_RUN_DIR:-${SURGEON_HOME:-$HOME/.llm-surgeon}/services}"
BIN="${SURGEON_VENV:-$REPO/.venv}/bin"
[ $# -ge 1 ] || { echo "usage: $0 NAME [key=value ...]" >&2; exit 2; }
[ -f "$RUN_DIR/env.sh" ] || { echo "error: no services in $RUN_DIR (run deployments/start_services.sh)" >&2; exit 2; }
# shellcheck disable=SC1091
source "$RUN_DIR/env.sh"
name="$1"; shift
[[ "$name" == */* ]] || name="prune/$name"
exec "$BIN/python" "$REPO/deployments/run_deployment.py" "$name" "$@"
