#!/usr/bin/env bash
# GPU session 4, call 3 (one H200; the first GGUF half staged by a previous call in /root/g): protocol P structured
# 40 shots with the fixed bf16 factor matmul (the whole run's time and ppl at 90..50%; issue 7), fine-tuning of its
# 50% model (issue 6), then a Llama-2-7B 2:4 shot with what time is left (issue 7). Results are tarred into
# $OUT/res.tgz after every step (the device returns at most 8 files).
set -u
DATA=${DATA:-.gpudata}
MODEL=${MODEL:-/root/smolhf}
RES=/root/res3
mkdir -p $RES /root/g
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - T0) )); }
cp .gguf2/gguf.part.ab /root/g/ && bash benchmarks/gpu_convert.sh > $RES/convert.log 2>&1
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
FAST="--batch-size 16 --autocast bf16 --gram bf16"
step() { name=$1; shift; L=$(( $(left) - 5 )); [ $L -gt 20 ] || return 0
  timeout $L python3 "$@" --json $RES/$name.json > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
step p_structured40_bf16fixed benchmarks/protocol.py --model $MODEL $P $FAST --structure structured \
  --target-size 0.5 --shots 40 --eval-at 0.9,0.8,0.7,0.6,0.5 --save-at 0.5 --save-dir /root/pruned3 --tag P-fast
step ft_p_structured50 benchmarks/finetune.py --model $MODEL $P --heldout $DATA/heldout/heldout_p.npy \
  --heldout-max-windows 32 --from-pruned /root/pruned3/size-0.5 --final-steps 200 --no-dense-eval \
  --ft-batch-size 8 --warmup 10 --ft-autocast bf16 --ft-dtype bf16 --lrs 3e-5,1e-4 --validate-every 25 --tag P
step llama7b_24_1gpu benchmarks/arch_shot.py --arch llama-2-7b --nsamples 128 --seqlen 2048 --batch-size 2 \
  --gram bf16 --target-size 0.9875 --structure 2:4 --update-batch-layers 4
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
