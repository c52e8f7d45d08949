#!/usr/bin/env bash
# Twelfth session, one H200: where a batch-64 and a batch-16 decode step goes (torch.profiler kernels, dense vs
# pruned), Llama-2-7B architecture with random weights at the coupled-OBS 70% structure with empty FFNs (issue 5:
# batch 64 reached 86.7% and batch 16 89.8% of the ideal speed-up).
set -u
RES=/root/res12p
source benchmarks/gpu_steps.sh
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --decode-graph --eager-prefill \
  --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64 --profile-steps 64"
step prof_b64 170 $M7 --repeats 3 --decode-batch 64
step prof_b16 170 $M7 --repeats 3 --decode-batch 16
tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; for f in $RES/prof*.log; do echo $f; grep -A40 "^profile" $f | head -60; done
