#!/usr/bin/env bash
# Next GPU call (one H200; random weights, no model files): issue 5, the Llama-2-7B architecture at the coupled-OBS
# 70% structure with empty FFNs materialized as no work (kept_llama7b_obs70_empty.json): the 8 x 2048 prefill and
# batched decoding at batch 4 and 64 (batch 1 and 16 were measured by benchmarks/gpu_s9_call4.sh); then batch 16 again
# with 5 repeats (its 89.7% was 0.3 points short of the target: a second, longer measurement, both reported).
set -u
RES=/root/res10
source benchmarks/gpu_steps.sh
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --repeats 3 --decode-graph"
step empty_prefill_b4 200 $M7 --prefill-batch 8 --prefill-len 2048 --prompt-len 32 --decode-tokens 64 --decode-batch 4
step empty_b16_r5 150 ${M7/--repeats 3/--repeats 5} --eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 \
  --decode-tokens 64 --decode-batch 16
step empty_b64 170 $M7 --eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64 \
  --decode-batch 64
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -h "ideal" $RES/empty_*.log | head
