#!/usr/bin/env bash
# Eighteenth session, two calls on one GPU machine kept warm (results in /root/res18, returned as $OUT/res.tgz):
#   STAGE=1 (carry .gguf1 and .whl): stage the first GGUF half and the gguf wheel; run the GPU tests of the coupled
#     structures (the CUDA offload test added in the seventeenth session had not run on a GPU).
#   STAGE=2 (carry .gguf2 and .gpudata): convert SmolLM2, then protocol P (seed 0) with the model's forward passes in
#     fp32 and only the baselines' input statistics and mask/OBS math in float64 (`protocol.py --baseline-dtype fp64`),
#     at calibration batch 1 and 8: does taking fp32 rounding out of SparseGPT's solver alone remove its 2:4 spread
#     over summation orders (139.3-148.4 in fp32), and where does it land against the references?
set -u
DATA=${DATA:-.gpudata}
MODEL=/root/smolhf
RES=${RES:-/root/res18}
source benchmarks/gpu_steps.sh
if [ "${STAGE:-0}" = 1 ]; then
  mkdir -p /root/g /root/site && cp .gguf1/gguf.part.aa /root/g/ && pip install -q --no-deps --target /root/site .whl/gguf-*.whl
  echo "staged at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  timeout 300 python3 -m pytest -q -m gpu tests/test_coupled.py -p no:cacheprovider > $RES/gpu_tests.log 2>&1
  echo "gpu tests rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES .; cat $RES/timeline.txt; tail -5 $RES/gpu_tests.log
  exit 0
fi
bash benchmarks/gpu_convert.sh >> $RES/convert.log 2>&1
echo "model ready at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
P="benchmarks/protocol.py --model $MODEL --calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy
  --eval-seqlen 2048 --target-size 0.5 --no-dense-eval --baseline-dtype fp64"
step p_sparsegpt24_b64_bs1 110 $P --batch-size 1 --method sparsegpt --structure 2:4 --tag P-bs1-b64
step p_sparsegpt50_b64_bs1 110 $P --batch-size 1 --method sparsegpt --structure unstructured --tag P-bs1-b64
step p_sparsegpt24_b64_bs8 110 $P --batch-size 8 --method sparsegpt --structure 2:4 --tag P-bs8-b64
step p_sparsegpt50_b64_bs8 110 $P --batch-size 8 --method sparsegpt --structure unstructured --tag P-bs8-b64
step p_wanda24_b64_bs1 100 $P --batch-size 1 --method wanda --structure 2:4 --tag P-bs1-b64
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -o '"ppl": [0-9.]*' $RES/p_*.json; for f in $RES/p_*.log; do tail -2 $f; done
