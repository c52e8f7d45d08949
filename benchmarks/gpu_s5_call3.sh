#!/usr/bin/env bash
# GPU session 5, call 3 (one H200): stage the first GGUF half and the gguf wheel for call 4, and run the GPU tests
# of the compiled speed path (whole-step CUDA-graph decode against eager decoding on tiny models).
set -u
RES=/root/res3
mkdir -p $RES /root/g /root/site
export PYTHONUNBUFFERED=1
cp .gguf1/gguf.part.aa /root/g/
pip install -q --no-deps --target /root/site .whl/gguf-*.whl > $RES/pip.log 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_speed_compile.py -m gpu > $RES/gpu_tests.log 2>&1
echo "gpu tests rc=$?" >> $RES/timeline.txt
tar czf $OUT/res.tgz -C $RES .
