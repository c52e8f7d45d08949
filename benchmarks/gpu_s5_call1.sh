#!/usr/bin/env bash
# GPU session 5, call 1 (one H200; random weights, no model files): issue 5, batched decoding of the
# Llama-2-7B architecture at the coupled 70% structure with the whole decode step captured as one CUDA graph
# (`--decode-graph`), with a profile of where the step's time goes, against the earlier reduce-overhead path.
# Also stages the first GGUF half and the gguf wheel for call 2. Results are tarred into $OUT/res.tgz.
set -u
RES=/root/res1
mkdir -p $RES /root/g /root/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - T0) )); }
[ -f .gguf1/gguf.part.aa ] && cp .gguf1/gguf.part.aa /root/g/
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /root/site .whl/gguf-*.whl > $RES/pip.log 2>&1
nvidia-smi > $RES/nvidia-smi.txt 2>&1
KEPT=benchmarks/results/gpu-2026-11-28b/kept_llama7b_obs70.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --repeats 3"
DEC="--eager-prefill --prefill-batch 1 --prefill-len 16"
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
step graph_b16 270 $M7 --decode-graph --prefill-batch 8 --prefill-len 2048 --decode-batch 16 --prompt-len 32 \
  --decode-tokens 64 --check-decode --profile-steps 64
step graph_b64 150 $M7 --decode-graph $DEC --decode-batch 64 --prompt-len 32 --decode-tokens 64 --check-decode \
  --profile-steps 64
step graph_b256 150 $M7 --decode-graph $DEC --decode-batch 256 --prompt-len 32 --decode-tokens 32 --check-decode
echo "all done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
tar czf $OUT/res.tgz -C $RES .
