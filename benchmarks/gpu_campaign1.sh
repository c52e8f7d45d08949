#!/usr/bin/env bash
# GPU campaign of 2026-11-28 (second session): coupled vs independent structures and speed of materialized models
# (issue 5), 2:4 baselines at calibration batch 1 and A1 2:4 LLM Surgeon (issue 3). Expects the converted SmolLM2
# at /root/smolhf and the token files under $DATA (a1/, p/). Quality jobs run concurrently (detached); the speed
# jobs run afterwards, alone on the GPU. Results: JSON + logs in /root/res.
set -u
DATA=${DATA:-.gpudata}
MODEL=/root/smolhf
RES=/root/res
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
A1="--calibration $DATA/a1/calibration_windows.npy --eval $DATA/a1/eval_windows.npy"
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
proto() { name=$1; shift; python3 benchmarks/protocol.py --model $MODEL --json $RES/$name.json "$@" > $RES/$name.log 2>&1; }
speed() { name=$1; shift; python3 benchmarks/materialized_speed.py --json $RES/$name.json "$@" > $RES/$name.log 2>&1; }
export -f proto speed; export MODEL RES DATA A1 P

# quality: three concurrent streams
setsid nohup bash -c "
proto p_coupled12 $P --structure coupled --target-size 0.7 --shots 12 --eval-at 0.9,0.8,0.7 --batch-size 8 --autocast bf16 --no-dense-eval --save-kept $RES/kept_p_coupled --tag P
" > $RES/stream1.log 2>&1 &
setsid nohup bash -c "
proto p_structured_sum12 $P --structure structured --target-size 0.7 --shots 12 --eval-at 0.9,0.8,0.7 --batch-size 8 --autocast bf16 --no-dense-eval --save-kept $RES/kept_p_structured --tag P
" > $RES/stream2.log 2>&1 &
setsid nohup bash -c "
proto a1_coupled12 $A1 --structure coupled --target-size 0.7 --shots 12 --eval-at 0.9,0.8,0.7 --batch-size 8 --no-dense-eval --save-kept $RES/kept_a1_coupled --tag A1
for m in wanda sparsegpt; do for s in 2:4 unstructured; do t=\$(echo \$s | tr -d :)
  proto p_\${m}_\${t}_bs1 $P --method \$m --structure \$s --target-size 0.5 --batch-size 1 --no-dense-eval --tag P-bs1
done; done
proto a1_surgeon_24_5 $A1 --structure 2:4 --target-size 0.5 --shots 5 --eval-at 0.5 --batch-size 8 --no-dense-eval --tag A1
" > $RES/stream3.log 2>&1 &
echo launched quality
