#!/usr/bin/env bash
# GPU session 4, call 1 (nvidia-h200-x2; random weights, no model files): issue 7 (Llama-2-7B-architecture shots of
# each structure type with the fixed bf16 factor matmul — fp32 output —, and the exact radix selection on the GPU;
# a Llama-2-13B structured shot with factors spread over both GPUs and the inverses parked on the GPU that held
# their factors), issue 5 (compiled 7B decode at larger batch). Also stages the first GGUF half and the gguf wheel
# for call 2. Every step has its own time limit so the call stays under 10 minutes. Results in $RES.
set -u
RES=${RES:-${OUT:-/root/res}}
mkdir -p $RES /root/g /root/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - T0) )); }
[ -f .gguf1/gguf.part.aa ] && cp .gguf1/gguf.part.aa /root/g/
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /root/site .whl/gguf-*.whl > $RES/pip.log 2>&1
nvidia-smi > $RES/nvidia-smi.txt 2>&1
SHOT7B="--arch llama-2-7b --nsamples 128 --seqlen 2048 --batch-size 2 --gram bf16 --target-size 0.9875"
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt; }
export -f step left; export RES T0 SHOT7B

(
  export CUDA_VISIBLE_DEVICES=0
  step llama7b_24_1gpu 190 benchmarks/arch_shot.py $SHOT7B --structure 2:4 --update-batch-layers 4
  step llama7b_structured_1gpu 130 benchmarks/arch_shot.py $SHOT7B --structure structured
) &
(
  export CUDA_VISIBLE_DEVICES=1
  step llama7b_unstructured_1gpu 230 benchmarks/arch_shot.py $SHOT7B --structure unstructured --update-batch-layers 4
  step speed_llama7b_compiled_decode256 150 benchmarks/materialized_speed.py --arch llama-2-7b \
    --kept benchmarks/results/gpu-2026-11-28b/kept_llama7b_obs70.json --dtype bf16 --prefill-batch 8 \
    --prefill-len 2048 --decode-batch 256 --prompt-len 32 --decode-tokens 32 --repeats 3 --compile
) &
wait
# both GPUs, one process: 13B structured shot, factors spread, inverses parked on the GPU that held their factors
step llama13b_structured_2gpu 260 benchmarks/arch_shot.py --arch llama-2-13b --nsamples 128 --seqlen 2048 \
  --batch-size 1 --gram bf16 --structure structured --target-size 0.9875 --factor-device spread
echo "all done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
