#!/usr/bin/env bash
# Fourteenth session, one GPU call (random weights, no model files): issue 5, decode attention. The Llama-2-7B
# architecture at the coupled-OBS 70% structure (kept_llama7b_obs70_empty.json), bf16, compiled, whole-step CUDA
# graph, 32-token prompt, 64 decoded tokens: FlexAttention's decoding kernel (blocks of 32 cache positions; those
# not written yet are skipped) against transformers' SDPA, both models each, at decode batch 16 and 64; first the
# GPU tests of the flex path (tiny models: compiled flex decode in the whole-step graph gives the eager tokens).
# The session's calls ran it whole (flex steps failed there) and then subsets of its steps (results timeline.txt);
# a flex step compiles longer than an SDPA one: 110 s cut one, hence 180.
set -u
RES=${RES:-/root/res14}
source benchmarks/gpu_steps.sh
timeout 150 python3 -m pytest -q -m gpu tests/test_speed_compile.py -k flex -p no:cacheprovider > $RES/gpu_tests.log 2>&1
echo "gpu_tests rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile --decode-graph --eager-prefill
  --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
step flex_b16 180 $M7 --repeats 5 --decode-batch 16 --decode-attention flex
step sdpa_b16 110 $M7 --repeats 5 --decode-batch 16
step flex_b64 180 $M7 --repeats 3 --decode-batch 64 --decode-attention flex
step sdpa_b64 110 $M7 --repeats 3 --decode-batch 64
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; tail -3 $RES/gpu_tests.log; grep -h "decode:" $RES/*_b*.log
