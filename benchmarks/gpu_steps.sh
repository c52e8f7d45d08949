# Shared by the GPU call scripts that time one benchmark per step (source it after setting RES, the results folder on
# the device): each `step NAME LIMIT ARGS...` runs `python3 ARGS --json $RES/NAME.json` under a time limit cut to what
# is left of DEADLINE (seconds since sourcing, default 540), logs to $RES/NAME.log, notes its exit code in
# $RES/timeline.txt and refreshes $OUT/res.tgz, so a call cut short still returns what finished.
set -u
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - T0) )); }
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
