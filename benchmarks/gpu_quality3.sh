#!/usr/bin/env bash
# GPU session 3, call 2 (nvidia-h200-x2, SmolLM2 converted to /root/smolhf): issue 7 (protocol P, structured 40
# shots: the whole run's time with bf16 compute and bf16 factor matmuls), issue 6 (fine-tuning at 70% / 50% and
# 2:4 under P, A1), issue 3 (layer-wise baselines with true-sequential calibration, batch 1). Two GPUs, each with
# its own queue; every step is limited so the call stays under 10 minutes. Results in $RES.
set -u
DATA=${DATA:-.gpudata}
MODEL=${MODEL:-/root/smolhf}
RES=${RES:-${OUT:-/root/res}}
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - T0) )); }
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
A1="--calibration $DATA/a1/calibration_windows.npy --eval $DATA/a1/eval_windows.npy"
FAST="--batch-size 16 --autocast bf16 --gram bf16"
FT="--final-steps 200 --ft-batch-size 8 --warmup 10 --ft-autocast bf16 --ft-dtype bf16"
proto() { name=$1; shift; L=$(( $(left) - 5 )); [ $L -gt 20 ] || return 0
  timeout $L python3 benchmarks/protocol.py --model $MODEL --json $RES/$name.json "$@" > $RES/$name.log 2>&1; }
ft() { name=$1; shift; L=$(( $(left) - 5 )); [ $L -gt 20 ] || return 0
  timeout $L python3 benchmarks/finetune.py --model $MODEL --json $RES/$name.json "$@" > $RES/$name.log 2>&1; }
export -f proto ft left; export MODEL RES DATA P A1 FAST FT T0

# GPU 0: the issue-7 timing run (dense eval + 40 shots + 5 evaluations), then 2:4 with fine-tuning, then baselines
(
  export CUDA_VISIBLE_DEVICES=0
  proto p_structured40_fast $P $FAST --structure structured --target-size 0.5 --shots 40 \
    --eval-at 0.9,0.8,0.7,0.6,0.5 --tag P-fast
  echo "gpu0 structured done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  ft ft_p_24 $P --heldout $DATA/heldout/heldout_p.npy $FT --lrs 1e-4,3e-4 --structure 2:4 --target-size 0.5 \
    --shots 1 $FAST --no-dense-eval --tag P
  echo "gpu0 2:4 done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  for m in wanda sparsegpt; do for s in 2:4 unstructured; do t=$(echo $s | tr -d :)
    proto p_${m}_${t}_tseq_bs1 $P --method $m --structure $s --target-size 0.5 --batch-size 1 --true-sequential \
      --no-dense-eval --tag P-true-sequential
  done; done
  echo "gpu0 baselines done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
) &
# GPU 1: structured 40 shots with fine-tuned copies at 70% and 50%, then A1 structured with fine-tuning at 70%
(
  export CUDA_VISIBLE_DEVICES=1
  ft ft_p_structured $P --heldout $DATA/heldout/heldout_p.npy $FT --lrs 3e-5,1e-4,3e-4 --structure structured \
    --target-size 0.5 --shots 40 --finetune-at 0.7,0.5 $FAST --tag P
  echo "gpu1 P fine-tuning done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  ft ft_a1_structured $A1 --heldout $DATA/heldout/heldout_a1.npy $FT --ft-autocast none --ft-dtype fp32 \
    --lrs 1e-4,3e-4 --structure structured \
    --target-size 0.7 --shots 12 --batch-size 8 --tag A1
  echo "gpu1 A1 done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
) &
wait
echo "all done at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
