#!/usr/bin/env bash
# Start the pipeline's services on 127.0.0.1 (free ports unless PREFECT_PORT / MLFLOW_PORT are set), over the one
# store in SURGEON_HOME (default ~/.llm-surgeon) that `make demo` and the `surgeon` command use too:
#   - a Prefect server (UI + API, SQLite under SURGEON_HOME/prefect),
#   - an MLflow tracking server (SQLite backend SURGEON_HOME/mlflow.db, artifacts SURGEON_HOME/mlartifacts),
#   - a Prefect process worker for the pool `surgeon-cpu`,
# then create the work pools and deploy deployments/prefect.yaml. Logs, pid files, env.sh and services.json (the
# servers' addresses: `surgeon prune/promote/gc` use the running servers through it) go to RUN_DIR; every process
# runs in its own process group, which deployments/stop_services.sh stops.
#
#   deployments/start_services.sh [RUN_DIR]        (default: $SURGEON_RUN_DIR or SURGEON_HOME/services)
#   source RUN_DIR/env.sh                          (PREFECT_API_URL, MLFLOW_TRACKING_URI for your shell)
#   deployments/run_deployment.sh tiny-test        (run a deployment and wait for it)
#   deployments/stop_services.sh [RUN_DIR]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SURGEON_HOME="${SURGEON_HOME:-$HOME/.llm-surgeon}"
mkdir -p "$SURGEON_HOME"
SURGEON_HOME="$(cd "$SURGEON_HOME" && pwd)"
RUN_DIR="${1:-${SURGEON_RUN_DIR:-$SURGEON_HOME/services}}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
BIN="${SURGEON_VENV:-$REPO/.venv}/bin"
WAIT_S="${SURGEON_SERVICES_WAIT_S:-180}"

for name in prefect-server mlflow-server worker; do
    if [ -f "$RUN_DIR/$name.pid" ] && kill -0 "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null; then
        echo "error: $name already running (pid $(cat "$RUN_DIR/$name.pid")); run deployments/stop_services.sh $RUN_DIR" >&2
        exit 2
    fi
done

free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PREFECT_PORT="${PREFECT_PORT:-$(free_port)}"
MLFLOW_PORT="${MLFLOW_PORT:-$(free_port)}"

cat > "$RUN_DIR/env.sh" <<ENV
export SURGEON_HOME="$SURGEON_HOME"
export PREFECT_HOME="$SURGEON_HOME/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
export SURGEON_REPO="$REPO"
ENV
# shellcheck disable=SC1091
source "$RUN_DIR/env.sh"

# start NAME CMD...: in a new session (own process group), pid in RUN_DIR/NAME.pid, output in RUN_DIR/NAME.log
start() {
    local name="$1"; shift
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$RUN_DIR/$name.pid" "$@" > "$RUN_DIR/$name.log" 2>&1 < /dev/null &
    for _ in $(seq 50); do [ -s "$RUN_DIR/$name.pid" ] && break; sleep 0.1; done
    echo "started $name (pid $(cat "$RUN_DIR/$name.pid"), log $RUN_DIR/$name.log)"
}

wait_http() {  # wait_http NAME URL
    "$BIN/python" - "$1" "$2" "$WAIT_S" "$RUN_DIR/$1.log" <<'PY'
import sys, time, urllib.request
name, url, limit, log = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
t0 = time.time()
while time.time() - t0 < limit:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                print(f"{name} ready after {time.time() - t0:.0f} s: {url}")
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
print(f"error: {name} not ready after {limit:.0f} s ({url}); last lines of {log}:", file=sys.stderr)
print("".join(open(log).readlines()[-20:]), file=sys.stderr)
sys.exit(1)
PY
}

cleanup_on_error() { echo "start_services: failed; stopping what was started" >&2; "$REPO/deployments/stop_services.sh" "$RUN_DIR" >&2 || true; }
trap cleanup_on_error ERR

mkdir -p "$PREFECT_HOME"
start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
start mlflow-server "$BIN/mlflow" server --backend-store-uri "sqlite:///$SURGEON_HOME/mlflow.db" \
    --artifacts-destination "$SURGEON_HOME/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
wait_http prefect-server "http://127.0.0.1:$PREFECT_PORT/api/health"
wait_http mlflow-server "http://127.0.0.1:$MLFLOW_PORT/health"

for pool in surgeon-cpu surgeon-gpu; do
    "$BIN/prefect" work-pool inspect "$pool" > /dev/null 2>&1 || "$BIN/prefect" work-pool create "$pool" --type process > /dev/null
done
"$BIN/prefect" work-pool set-concurrency-limit surgeon-cpu 1 > /dev/null  # one pruning job at a time per CPU host
(cd "$REPO" && "$BIN/prefect" --no-prompt deploy --prefect-file deployments/prefect.yaml --all > "$RUN_DIR/deploy.log" 2>&1) \
    || { echo "error: prefect deploy failed; see $RUN_DIR/deploy.log" >&2; tail -20 "$RUN_DIR/deploy.log" >&2; false; }
echo "deployed: $(grep -o "Deployment '[^']*' successfully created" "$RUN_DIR/deploy.log" | cut -d"'" -f2 | tr '\n' ' ')"

start worker "$BIN/prefect" worker start --pool surgeon-cpu --type process --name "surgeon-cpu-$(hostname)"
trap - ERR
# the addresses the surgeon command reads (surgeon_cli.common.running_services), written last: a complete file
# names servers that answered
"$BIN/python" - "$RUN_DIR/services.json" <<PY
import json, os, sys, tempfile
data = {"prefect_api_url": "$PREFECT_API_URL", "mlflow_tracking_uri": "$MLFLOW_TRACKING_URI",
        "prefect_ui_url": "http://127.0.0.1:$PREFECT_PORT", "surgeon_home": "$SURGEON_HOME", "run_dir": "$RUN_DIR"}
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(sys.argv[1]))
with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1)
os.replace(tmp, sys.argv[1])
PY

cat <<MSG

Services are up (store $SURGEON_HOME, run dir $RUN_DIR):
  Prefect UI  http://127.0.0.1:$PREFECT_PORT
  MLflow UI   http://127.0.0.1:$MLFLOW_PORT
  surgeon prune / promote / gc use them while they run (services.json)
  source $RUN_DIR/env.sh                     # point your shell's prefect / mlflow at them
  deployments/run_deployment.sh tiny-test    # run a deployment (first: .venv/bin/python deployments/make_tiny_model.py runs/tiny-model)
  deployments/stop_services.sh $RUN_DIR
MSG
