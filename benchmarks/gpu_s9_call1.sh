#!/usr/bin/env bash
# GPU session 9, call 1 (one H200; random data, no model files): issue 3, whether the element update of a 50% shot
# gains from solving every layer shape's batch at once on CUDA streams (--concurrent) or from larger Cholesky
# batches (--chol-scan). Also stages the first GGUF half and the gguf wheel for the next call
# (benchmarks/gpu_s6_p40.sh, which must follow within the machine's 30 s warm window).
set -u
RES=/root/res1
mkdir -p $RES /root/g /root/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
[ -f .gguf1/gguf.part.aa ] && cp .gguf1/gguf.part.aa /root/g/
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /root/site .whl/gguf-*.whl > $RES/pip.log 2>&1
timeout ${LIMIT:-150} python3 benchmarks/update_speed.py --device cuda --drop-frac 0.5 --concurrent \
  --chol-scan 1 2 4 7 --json $RES/upd_concurrent.json > $RES/upd_concurrent.log 2>&1
echo "upd_concurrent rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; tail -25 $RES/upd_concurrent.log
