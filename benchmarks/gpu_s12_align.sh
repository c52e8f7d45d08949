#!/usr/bin/env bash
# Twelfth session, one H200: issue 5's batched decoding of the Llama-2-7B architecture (random weights) at the
# coupled-OBS 70% structure with empty FFNs, with the FFN widths padded to multiples of 128 and 256 instead of 64
# (batch 16 was 89.7-89.8% of the ideal speed-up with 64, batch 64 86.7%).
set -u
RES=/root/res12
source benchmarks/gpu_steps.sh
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --decode-graph --eager-prefill \
  --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
step b16_align128 150 $M7 --repeats 5 --decode-batch 16 --align 128
step b64_align128 150 $M7 --repeats 3 --decode-batch 64 --align 128
step b16_align256 150 $M7 --repeats 5 --decode-batch 16 --align 256
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; for f in $RES/b*.log; do echo $f; grep "ideal" $f | tail -1; done
