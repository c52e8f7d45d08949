#!/usr/bin/env bash
# GPU session 6, calls 2 and 3 (one H200, back to back so the machine keeps /root): issue 3, protocol P LLM Surgeon
# unstructured 50% and 2:4 in 40 shots, the two runs sharing the GPU. Both keep a checkpoint after every shot in
# /root (benchmarks/protocol.py --checkpoint), so the second call resumes them after their last finished shot.
# Call 2 carries the second GGUF half (the first was staged by call 1) and converts the model first.
# Reusable: RUNS="unstructured" (or "24", default both) picks the runs, EXTRA adds protocol.py flags to both
# (e.g. EXTRA="--update-concurrent 7"), DEADLINE the seconds the runs may take. SEQUENTIAL=1 runs them one after the
# other instead of sharing the GPU (shared, the update at 27.5% removed took 27.9 s; ~11 s expected alone): the same command in every call
# then resumes the unfinished run and goes on to the next (a finished run only reloads its checkpoint).
set -u
DATA=${DATA:-.gpudata}
MODEL=/root/smolhf
RES=/root/resp
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
DEADLINE=${DEADLINE:-575}
bash benchmarks/gpu_convert.sh >> $RES/convert.log 2>&1
echo "call start $(date -u +%FT%TZ), model ready at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
FAST="--batch-size 16 --autocast bf16 --gram bf16 --shots 40 --target-size 0.5 --eval-at 0.5 --tag P-40"
run() { name=$1; shift; L=$(( DEADLINE - ($(date +%s) - T0) ))
  [ $L -gt 30 ] || { echo "$name skipped: no time left" >> $RES/timeline.txt; return; }
  timeout $L python3 benchmarks/protocol.py --model $MODEL $P $FAST "$@" --checkpoint /root/ck_$name \
    --json $RES/$name.json >> $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt; }
RUNS=${RUNS:-"unstructured 24"}
runs() {
  case " $RUNS " in *" unstructured "*) run p_unstructured40 --structure unstructured ${EXTRA:-} & 
    [ -n "${SEQUENTIAL:-}" ] && wait $! ;; esac
  case " $RUNS " in *" 24 "*) run p_24_40 --structure 2:4 --no-dense-eval ${EXTRA:-} & ;; esac
  wait; }
runs &
while [ $(( $(date +%s) - T0 )) -lt $(( DEADLINE + 5 )) ] && [ -n "$(jobs -r)" ]; do
  sleep 20; tar czf $OUT/res.tgz -C $RES . 2>/dev/null; done
wait
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
