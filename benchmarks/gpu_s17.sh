#!/usr/bin/env bash
# Seventeenth session, one call (no carry): issue 5's Llama-2-7B decode speeds rerun with the current code, where
# template prologue fusion is off only in the compile options of a model with FlexAttention decode steps (since
# 66d746d) instead of inductor's global config, which the fifteenth/sixteenth sessions' figures used. The 70%
# coupled-OBS structure, bf16, compiled, whole-step CUDA-graph decode, FlexAttention at batch 1/4/16/64, and SDPA at
# batch 64 (the batch where the two differ most) as the control on the same machine. Results in /root/res17,
# returned as $OUT/res.tgz.
set -u
RES=${RES:-/root/res17}
source benchmarks/gpu_steps.sh
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile"
DEC="$M7 --decode-graph --eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
step flex_b64 150 $DEC --repeats 3 --decode-batch 64 --decode-attention flex
step sdpa_b64 120 $DEC --repeats 3 --decode-batch 64
step flex_b16 150 $DEC --repeats 5 --decode-batch 16 --decode-attention flex
step flex_b4 150 $DEC --repeats 5 --decode-batch 4 --decode-attention flex
step flex_b1 150 $DEC --repeats 5 --decode-batch 1 --decode-attention flex
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -h "decode:\|prefill:\|speed-up\|ideal" $RES/*.log 2>/dev/null | tail -30
