#!/usr/bin/env bash
# GPU session 6, call 4 (one H200; random weights, no model files): issue 5, batched decoding of the Llama-2-7B
# architecture at the coupled 70% structure (whole-step CUDA graph): batch 4 with PyTorch's default attention,
# batch 16 with math attention (fused by inductor instead of cuDNN's SDPA kernel), batch 4 with math attention.
# (Call 1 gave these steps too little time: both were cut while compiling.)
set -u
RES=/root/res4
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - T0) )); }
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
KEPT=benchmarks/results/gpu-2026-11-28b/kept_llama7b_obs70.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --repeats 3 --decode-graph"
DEC="--eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
step dflt_b4 190 $M7 $DEC --decode-batch 4
step math_b16 190 $M7 $DEC --sdpa math --decode-batch 16
step math_b4 190 $M7 $DEC --sdpa math --decode-batch 4
cat $RES/timeline.txt; grep -h "decode" $RES/*.log | grep -i "speed\|ideal" | head
