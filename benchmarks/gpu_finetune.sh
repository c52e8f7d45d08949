#!/usr/bin/env bash
# Issue 6 on one GPU: protocol P with and without mask-preserving fine-tuning (benchmarks/finetune.py), the first-order
# term, and interleaved fine-tuning. Expects the converted SmolLM2 at /root/smolhf (see gpu_quality.sh), the token
# files under $DATA (p/, heldout/heldout_p.npy from benchmarks/heldout_windows.py). The chosen streams (arguments,
# default "1 2": the required measurements) run concurrently, detached; JSON + logs in $RES (ft_*.json).
# Alone on an H200, stream 1 takes about 15 minutes (40 shots at ~18 s, then 3 lrs x 2 sizes of ~35 s fine-tuning),
# stream 2 about 9; 3 and 4 are as long as 1.
set -u
DATA=${DATA:-.gpudata}
MODEL=${MODEL:-/root/smolhf}
RES=${RES:-/root/res}
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048 --heldout $DATA/heldout/heldout_p.npy"
# bf16 compute for curvature and fine-tuning; the fine-tuned copy is held in bf16 with fp32 masters + AdamW state
FT="--final-steps 200 --lrs 3e-5,1e-4,3e-4 --ft-batch-size 8 --warmup 10 --ft-autocast bf16 --ft-dtype bf16"
ft() { name=$1; shift; python3 benchmarks/finetune.py --model $MODEL --json $RES/$name.json "$@" > $RES/$name.log 2>&1; }
export -f ft; export MODEL RES DATA P FT
STREAMS=${*:-1 2}
on() { case " $STREAMS " in *" $1 "*) return 0;; esac; return 1; }
# 1. structured, 40 shots to 50%: fine-tune copies at 70% and 50%
on 1 && setsid nohup bash -c "ft ft_p_structured $P $FT --structure structured --target-size 0.5 --shots 40 --finetune-at 0.7,0.5 --batch-size 16 --autocast bf16 --tag P" > $RES/ft_stream1.log 2>&1 &
# 2. 2:4, 5 shots
on 2 && setsid nohup bash -c "ft ft_p_24 $P $FT --structure 2:4 --target-size 0.5 --shots 5 --batch-size 16 --autocast bf16 --tag P" > $RES/ft_stream2.log 2>&1 &
# 3. first-order term in costs and updates (same schedule as 1); scale 1 (the exact quadratic model) destroys the
#    model (CPU demo: ppl 3.7e9), 0.001 helped a little there (218.8 vs 228.6): FO_SCALE overrides
FO_SCALE=${FO_SCALE:-0.001}; export FO_SCALE
on 3 && setsid nohup bash -c "ft ft_p_structured_fo $P $FT --structure structured --target-size 0.5 --shots 40 --finetune-at 0.7,0.5 --batch-size 16 --autocast bf16 --first-order --first-order-scale $FO_SCALE --tag P-first-order" > $RES/ft_stream3.log 2>&1 &
# 4. interleaved: 5 steps (lr 1e-4) after every shot, then the same final fine-tuning
on 4 && setsid nohup bash -c "ft ft_p_structured_inter $P $FT --structure structured --target-size 0.5 --shots 40 --finetune-at 0.7,0.5 --batch-size 16 --autocast bf16 --finetune-steps 5 --finetune-lr 1e-4 --tag P-interleaved" > $RES/ft_stream4.log 2>&1 &
echo "launched streams: $STREAMS"
