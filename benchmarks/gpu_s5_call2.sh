#!/usr/bin/env bash
# GPU session 5, call 2 (one H200; the first GGUF half staged by call 1 in /root/g): issue 3, protocol P LLM Surgeon
# unstructured 50% and 2:4 in 40 shots (the two runs share the GPU: each needs ~18 GB, their phases interleave);
# then issue 5, the structure report of a local MLflow run's coupled 70% structure timed on the H200
# (`surgeon report --kept`, attached to the run afterwards with `surgeon report --attach`).
# Every step has its own time limit; results are tarred into $OUT/res.tgz after each step.
set -u
DATA=${DATA:-.gpudata}
MODEL=${MODEL:-/root/smolhf}
RES=/root/res2
mkdir -p $RES /root/g
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - T0) )); }
cp .gguf2/gguf.part.ab /root/g/ && bash benchmarks/gpu_convert.sh > $RES/convert.log 2>&1
echo "converted at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
FAST="--batch-size 16 --autocast bf16 --gram bf16"
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
step p_unstructured40 400 benchmarks/protocol.py --model $MODEL $P $FAST --structure unstructured --target-size 0.5 \
  --shots 40 --eval-at 0.5 --tag P-40 --json $RES/p_unstructured40.json &
step p_24_40 400 benchmarks/protocol.py --model $MODEL $P $FAST --structure 2:4 --target-size 0.5 --shots 40 \
  --eval-at 0.5 --no-dense-eval --tag P-40 --json $RES/p_24_40.json &
wait
KEPT=$(ls benchmarks/results/gpu-2026-12-04/kept_*.json | head -1)
step report_h200 200 -c "from surgeon.cli import main; raise SystemExit(main(['report', '--kept', '$KEPT', \
'--dense', '$MODEL', '--device', 'cuda', '--json', '$RES/report_h200.json']))"
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
