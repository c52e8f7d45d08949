#!/usr/bin/env bash
# Run a deployment on the services of deployments/start_services.sh and wait for it to finish.
#   deployments/run_deployment.sh NAME [key=value ...]
# NAME is a prune deployment (tiny-test, small-cpu, paper-gpu) or FLOW/DEPLOYMENT (sweep/sweep-small-cpu);
# key=value pairs become the recipe `overrides` of prune/sweep runs (config fields: method.shots=3, eval.data=PATH)
# and plain parameters of other flows (promote/promote model_name=NAME version=V). Exit status 0 only if the flow run
# completed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${SURGEON_RUN_DIR:-$HOME/.llm-surgeon/services}"
BIN="${SURGEON_VENV:-$REPO/.venv}/bin"
[ $# -ge 1 ] || { echo "usage: $0 NAME [key=value ...]" >&2; exit 2; }
[ -f "$RUN_DIR/env.sh" ] || { echo "error: no services in $RUN_DIR (run deployments/start_services.sh)" >&2; exit 2; }
# shellcheck disable=SC1091
source "$RUN_DIR/env.sh"
name="$1"; shift
[[ "$name" == */* ]] || name="prune/$name"
args=()
if [[ "$name" == prune/* || "$name" == sweep/* ]]; then
    [ $# -eq 0 ] || args+=(--param "overrides=$("$BIN/python" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")")
else
    for kv in "$@"; do args+=(--param "$kv"); done
fi
exec "$BIN/prefect" deployment run "$name" "${args[@]}" --watch --watch-timeout "${SURGEON_RUN_TIMEOUT_S:-7200}"
