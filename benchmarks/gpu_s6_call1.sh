#!/usr/bin/env bash
# Ran at commit a1b9aed, whose blocked Cholesky (--cholesky, --chol-blocks) was removed after this measurement showed
# no gain in the whole update (BENCHMARKS.md, "Element update").
# GPU session 6, call 1 (one H200; random data and weights, no model files): issue 3, the blocked batched Cholesky
# of the element-update systems against torch's (alone, then the whole 50% update on SmolLM2 shapes with each);
# issue 5, batched decoding of the Llama-2-7B architecture at the coupled 70% structure with math attention
# (inductor-fused) and at batch 4. Also stages the first GGUF half and the gguf wheel for call 2.
set -u
RES=/root/res1
mkdir -p $RES /root/g /root/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-330} - ($(date +%s) - T0) )); }
[ -f .gguf1/gguf.part.aa ] && cp .gguf1/gguf.part.aa /root/g/
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /root/site .whl/gguf-*.whl > $RES/pip.log 2>&1
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
step chol 60 benchmarks/update_speed.py --device cuda --skip-update --chol-batch 30 --chol-n 2000 \
  --chol-blocks 128 256 512
step upd_blocked 70 benchmarks/update_speed.py --device cuda --drop-frac 0.5 --skip-cholesky --cholesky auto
step upd_torch 70 benchmarks/update_speed.py --device cuda --drop-frac 0.5 --skip-cholesky --cholesky torch
KEPT=benchmarks/results/gpu-2026-11-28b/kept_llama7b_obs70.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --repeats 3 --decode-graph"
DEC="--eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
step math_b16 100 $M7 $DEC --sdpa math --decode-batch 16 --profile-steps 32
step dflt_b4 90 $M7 $DEC --decode-batch 4
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -h "^== drop" $RES/upd_*.log; grep -h '"case"' $RES/chol.log | cut -c1-160
