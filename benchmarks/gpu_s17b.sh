#!/usr/bin/env bash
# Seventeenth session, two calls on one GPU machine kept warm (results in /root/res17b, returned as $OUT/res.tgz):
#   STAGE=1 (carry .gguf1 and .whl): stage the first GGUF half and the gguf wheel.
#   STAGE=2 (carry .gguf2 and .gpudata): convert SmolLM2, then protocol P (seed 0, batch 1) with the model, the
#     baselines' statistics and their math in float64 (`protocol.py --dtype fp64`): the value the paper's Wanda and
#     SparseGPT procedures give on these tokens without fp32 rounding, against our fp32 figures and the references'.
set -u
DATA=${DATA:-.gpudata}
MODEL=/root/smolhf
RES=${RES:-/root/res17b}
source benchmarks/gpu_steps.sh
if [ "${STAGE:-0}" = 1 ]; then
  mkdir -p /root/g /root/site && cp .gguf1/gguf.part.aa /root/g/ && pip install -q --no-deps --target /root/site .whl/gguf-*.whl
  echo "staged at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  exit 0
fi
bash benchmarks/gpu_convert.sh >> $RES/convert.log 2>&1
echo "model ready at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
P="benchmarks/protocol.py --model $MODEL --calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy
  --eval-seqlen 2048 --target-size 0.5 --batch-size 1 --no-dense-eval --dtype fp64 --tag P-bs1-fp64"
step p_sparsegpt24_fp64 150 $P --method sparsegpt --structure 2:4
step p_sparsegpt50_fp64 150 $P --method sparsegpt --structure unstructured
step p_wanda50_fp64 120 $P --method wanda --structure unstructured
step p_wanda24_fp64 120 $P --method wanda --structure 2:4
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -o '"ppl": [0-9.]*' $RES/p_*.json; for f in $RES/p_*.log; do tail -2 $f; done
