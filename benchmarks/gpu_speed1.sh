#!/usr/bin/env bash
# Speed of materialized models on the H200 (issue 5): Llama-2-7B architecture (random weights) pruned to 70% with
# coupled structures by our code, then SmolLM2 at the kept structures of the P/A1 runs of gpu_campaign1.sh.
set -u
MODEL=/root/smolhf
RES=/root/res
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
speed() { name=$1; shift; python3 benchmarks/materialized_speed.py --json $RES/$name.json "$@" > $RES/$name.log 2>&1; }
GPU="--dtype bf16 --prefill-batch 8 --prefill-len 2048 --decode-batch 64 --prompt-len 128 --decode-tokens 64 --repeats 5"
speed llama7b_coupled70 --arch llama-2-7b --prune-coupled 0.7 --shots 1 --nsamples 8 --seqlen 2048 --batch-size 2 $GPU --save-kept $RES/kept_llama7b_coupled70.json
for f in $RES/kept_p_coupled_0.*.json $RES/kept_p_structured_0.70.json; do
  b=$(basename $f .json); speed h200_$b --model $MODEL --kept $f $GPU --save
done
echo speed done
