#!/usr/bin/env bash
# GPU session 4, call 2 (nvidia-h200-x2; SmolLM2 joined from the two GGUF halves and converted to /root/smolhf):
# issue 7 (does the fixed bf16 factor matmul — fp32 output — match fp32 factors on the GPU, and protocol P
# structured 40 shots with it: the whole run's time and ppl), issue 6 (fine-tuning under P at 70% / 50% structured
# and 2:4 on that pruning; A1 on the GPU at 70% / 50% and 2:4 with held-out stopping). Results in $RES.
set -u
DATA=${DATA:-.gpudata}
MODEL=${MODEL:-/root/smolhf}
RES=${RES:-${OUT:-/root/res}}
mkdir -p $RES /root/g
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-565} - ($(date +%s) - T0) )); }
cp .gguf2/gguf.part.ab /root/g/ && bash benchmarks/gpu_convert.sh > $RES/convert.log 2>&1
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
A1="--calibration $DATA/a1/calibration_windows.npy --eval $DATA/a1/eval_windows.npy"
FAST="--batch-size 16 --autocast bf16 --gram bf16"
step() { name=$1; shift; L=$(( $(left) - 5 )); [ $L -gt 20 ] || return 0
  timeout $L python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt; }
export -f step left; export MODEL RES DATA P A1 FAST T0

(
  export CUDA_VISIBLE_DEVICES=0
  GA="benchmarks/gram_accuracy.py --model $MODEL --calibration $DATA/p/calibration_windows.npy --nsamples 16 \
    --batch-size 16 --autocast bf16 --gram bf16 --device cuda --eval $DATA/a1/eval_windows.npy --eval-windows 32"
  step gram_accuracy_p_gpu_fixed $GA
  step gram_accuracy_p_gpu_legacy $GA --legacy
  step p_structured40_bf16fixed benchmarks/protocol.py --model $MODEL $P $FAST --structure structured \
    --target-size 0.5 --shots 40 --eval-at 0.9,0.8,0.7,0.6,0.5 --save-at 0.7,0.5 --save-dir /root/pruned --tag P-fast
  step ft_p_structured benchmarks/finetune.py --model $MODEL $P --heldout $DATA/heldout/heldout_p.npy \
    --heldout-max-windows 32 --from-pruned /root/pruned/size-0.7,/root/pruned/size-0.5 --final-steps 200 \
    --ft-batch-size 8 --warmup 10 --ft-autocast bf16 --ft-dtype bf16 --lrs 3e-5,1e-4 --validate-every 25 --tag P
) &
(
  export CUDA_VISIBLE_DEVICES=1
  FT="--final-steps 200 --ft-batch-size 8 --warmup 10 --ft-autocast bf16 --ft-dtype bf16 --validate-every 25"
  step ft_p_24 benchmarks/finetune.py --model $MODEL $P --heldout $DATA/heldout/heldout_p.npy \
    --heldout-max-windows 32 $FT --lrs 3e-5,1e-4 --structure 2:4 --target-size 0.5 --shots 1 $FAST --tag P
  FTA="--final-steps 100 --ft-batch-size 4 --warmup 5 --validate-every 20 --heldout $DATA/heldout/heldout_a1.npy"
  step ft_a1_structured benchmarks/finetune.py --model $MODEL $A1 $FTA --lrs 1e-5,3e-5 --structure structured \
    --target-size 0.5 --shots 20 --finetune-at 0.7,0.5 --batch-size 8 --tag A1
  step ft_a1_24 benchmarks/finetune.py --model $MODEL $A1 $FTA --lrs 1e-5,3e-5 --structure 2:4 \
    --target-size 0.5 --shots 5 --batch-size 8 --no-dense-eval --tag A1
) &
wait
echo "all done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
