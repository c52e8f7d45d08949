#!/usr/bin/env bash
# GPU session 9, last call (one H200; random weights, no model files): issue 5, decoding of the Llama-2-7B
# architecture at the coupled-OBS 70% structure now that a layer whose FFN has no unit left is materialized as an
# EmptyMLP (no work) instead of a placeholder unit padded to 64 zero units (layers 21-31 of that structure):
# batch 1 and batch 16 with the whole-step CUDA graph, as in benchmarks/gpu_s6_call4.sh; then the GPU tests of the
# compiled decode path (which now include a materialized model with an empty FFN).
set -u
RES=/root/res4
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-400} - ($(date +%s) - T0) )); }
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --repeats 3 --decode-graph"
DEC="--eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
step empty_b1 170 $M7 $DEC --decode-batch 1
step empty_b16 170 $M7 $DEC --decode-batch 16
L=$(( $(left) - 5 )); if [ $L -gt 30 ]; then
  timeout $L python3 -m pytest -q -m gpu tests/test_speed_compile.py -p no:cacheprovider > $RES/gpu_tests.log 2>&1
  echo "gpu_tests rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt; fi
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -h "decode" $RES/empty_*.log | grep -i "ideal" | head; tail -3 $RES/gpu_tests.log
