#!/usr/bin/env bash
# Issue 3, A1 2:4: is the calibration amount why LLM Surgeon loses to SparseGPT under A1 (16k tokens) but wins
# under P (262k)? One-shot 2:4 LLM Surgeon and the layer-wise baselines on A1's 32 x 512 windows and on 128 x 512
# windows drawn the same way (the first 32 are A1's: benchmarks/a1_more_calibration.py); same A1 evaluation.
# Dev CPU, fp32, 2 threads. Usage: bash benchmarks/a1_data_scaling.sh RESULTS_DIR
set -u
RES=${1:-benchmarks/results/cpu-2026-12-04}
mkdir -p "$RES"
PY=${PY:-.venv/bin/python}
CAL128=${CAL128:-/tmp/exp/cal128x512.npy}
[ -f "$CAL128" ] || $PY benchmarks/a1_more_calibration.py --model models/smollm2-135m --windows 128 --output "$CAL128"
A1=../shared/data/a1
COMMON="--model models/smollm2-135m --eval $A1/eval_windows.npy --structure 2:4 --target-size 0.5 --eval-at 0.5
  --no-dense-eval --batch-size 4 --threads 2 --eval-batch-size 4"
run() { name=$1; shift; echo "== $name $(date -u +%FT%TZ)"; /usr/bin/time -v $PY benchmarks/protocol.py $COMMON "$@" \
  --json "$RES/$name.json" > "$RES/$name.log" 2>&1; echo "   rc=$? $(date -u +%FT%TZ)"; grep -E "ppl|Maximum resident" "$RES/$name.log" | tail -3; }
for what in ${RUNS:-ls16 sg128 ls128 sg16 wanda16 wanda128}; do case $what in
  ls16) run a1_ls_24_1shot_cal32 --method llm-surgeon --shots 1 --calibration $A1/calibration_windows.npy ;;
  ls128) run a1_ls_24_1shot_cal128 --method llm-surgeon --shots 1 --calibration "$CAL128" --nsamples 128 ;;
  sg16) run a1_sparsegpt_24_cal32 --method sparsegpt --calibration $A1/calibration_windows.npy ;;
  sg128) run a1_sparsegpt_24_cal128 --method sparsegpt --calibration "$CAL128" --nsamples 128 ;;
  wanda16) run a1_wanda_24_cal32 --method wanda --calibration $A1/calibration_windows.npy ;;
  wanda128) run a1_wanda_24_cal128 --method wanda --calibration "$CAL128" --nsamples 128 ;;
esac; done
