#!/usr/bin/env bash
# GPU session 3, call 1 (nvidia-h200-x2; no model files needed): issue 7 (Llama-2-7B-architecture shots with random
# weights: structured on 1 GPU and data-parallel on 2 GPUs, a 13B structured shot on 2 GPUs, 2:4 and unstructured
# 7B shots on 1 GPU), issue 5 (7B
# materialized-model prefill/decode speed, eager and compiled), and the element-update micro-benchmark.
# Every step has its own time limit so the whole call stays under the device's 10 minutes. Results in $RES.
set -u
RES=${RES:-${OUT:-/root/res}}
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-545} - ($(date +%s) - T0) )); }
nvidia-smi > $RES/nvidia-smi.txt 2>&1
SHOT7B="--arch llama-2-7b --nsamples 128 --seqlen 2048 --batch-size 2 --gram bf16"

# GPU 0: one structured shot (the first of a 40-shot schedule to 50%: 100% -> 98.75%)
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/arch_shot.py $SHOT7B --structure structured \
  --target-size 0.9875 --json $RES/llama7b_structured_1gpu.json > $RES/llama7b_structured_1gpu.log 2>&1 &
P0=$!
# GPU 1 meanwhile: the element-update micro-benchmark
CUDA_VISIBLE_DEVICES=1 timeout 100 python3 benchmarks/update_speed.py --device cuda --drop-frac 0.1 --reference-layers 3 \
  --json $RES/update_speed_smol_0.1.json > $RES/update_speed.log 2>&1 &
P1=$!
wait $P0 $P1
echo "phase 1 done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt

# both GPUs: the same structured shot, data-parallel (curvature shared out + all-reduced, solves spread by layer)
timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/arch_shot.py $SHOT7B --structure structured \
  --target-size 0.9875 --json $RES/llama7b_structured_2gpu.json > $RES/llama7b_structured_2gpu.log 2>&1
echo "phase 2 done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt

# both GPUs, one process: a Llama-2-13B-architecture structured shot; its fp32 factors (~125 GB) are spread over the
# two GPUs (factor_device="spread"), the inverses parked on the CPU between the cost and update phases
timeout 200 python3 benchmarks/arch_shot.py --arch llama-2-13b --nsamples 128 --seqlen 2048 --batch-size 1 --gram bf16 \
  --structure structured --target-size 0.9875 --factor-device spread --json $RES/llama13b_structured_2gpu.json \
  > $RES/llama13b_structured_2gpu.log 2>&1
echo "phase 3 done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt

# what is left: the compiled 7B decode at batch 16 (GPU 1; batch 64 was measured before) and one 2:4 shot (GPU 0)
L=$(( $(left) - 5 ))
if [ $L -gt 30 ]; then
  SPEED="--arch llama-2-7b --kept benchmarks/results/gpu-2026-11-28b/kept_llama7b_obs70.json --dtype bf16 \
    --prefill-batch 8 --prefill-len 2048 --decode-batch 16 --prompt-len 128 --decode-tokens 64 --repeats 5"
  CUDA_VISIBLE_DEVICES=1 timeout $L python3 benchmarks/materialized_speed.py $SPEED --compile \
    --json $RES/speed_llama7b_compiled_decode16.json > $RES/speed_llama7b_compiled_decode16.log 2>&1 &
  CUDA_VISIBLE_DEVICES=0 timeout $L python3 benchmarks/arch_shot.py $SHOT7B --structure 2:4 --target-size 0.9875 \
    --update-batch-layers 4 --json $RES/llama7b_24_1gpu.json > $RES/llama7b_24_1gpu.log 2>&1 &
  wait
fi
echo "all done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
