#!/usr/bin/env bash
# Twelfth session, one H200: where a batch-64 and a batch-16 decode step goes (torch.profiler kernels, dense vs
# pruned), Llama-2-7B architecture with random weights at the coupled-OBS 70% structure with empty FFNs (issue 5:
# batch 64 reached 86.7% and batch 16 89.8% of the ideal speed-up).
set -u
RES=/root/res12p
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - T0) )); }
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --decode-graph --eager-prefill \
  --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64 --profile-steps 64"
step prof_b64 170 $M7 --repeats 3 --decode-batch 64
step prof_b16 170 $M7 --repeats 3 --decode-batch 16
tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; for f in $RES/prof*.log; do echo $f; grep -A40 "^profile" $f | head -60; done
