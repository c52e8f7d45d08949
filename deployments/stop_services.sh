#!/usr/bin/env bash
# Stop what deployments/start_services.sh started in RUN_DIR, one process group at a time (a group includes the
# flow runs a worker started, and MLflow's uvicorn/job workers):
#   worker          SIGINT (graceful), a second SIGINT (Prefect's "stop now"), then SIGTERM, SIGKILL
#   mlflow-server   SIGTERM (it ignores SIGINT), then SIGKILL
#   prefect-server  SIGINT, then SIGTERM, SIGKILL
#   deployments/stop_services.sh [RUN_DIR]
set -uo pipefail
RUN_DIR="${1:-${SURGEON_RUN_DIR:-${SURGEON_HOME:-$HOME/.llm-surgeon}/services}}"
rm -f "$RUN_DIR/services.json"  # first: the surgeon command stops sending work to servers that are going away

# a process group is alive while it has a member that is not a zombie (orphans may wait a while to be reaped)
alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'; }

stop() {  # stop NAME SIGNAL:SECONDS ...
    local name="$1"; shift
    local pidfile="$RUN_DIR/$name.pid"
    [ -s "$pidfile" ] || return 0
    local pid t0=$SECONDS used="" step sig wait
    pid="$(cat "$pidfile")"
    for step in "$@"; do
        alive "$pid" || break
        sig="${step%%:*}" wait="${step##*:}"
        used="$sig"
        kill "-$sig" -- "-$pid" 2>/dev/null
        for _ in $(seq $((wait * 10))); do alive "$pid" || break; sleep 0.1; done
    done
    if alive "$pid"; then
        echo "warning: $name (process group $pid) still running" >&2
        return 1
    fi
    echo "stopped $name${used:+ (SIG$used, $((SECONDS - t0)) s)}"
    rm -f "$pidfile"
}

rc=0
stop worker INT:3 INT:5 TERM:5 KILL:5 || rc=1
stop mlflow-server TERM:10 KILL:5 || rc=1
stop prefect-server INT:10 TERM:5 KILL:5 || rc=1
exit $rc
