#!/usr/bin/env bash
# GPU session 5, call 4 (one H200; first GGUF half staged by call 3): issue 5 - the structure report of a local
# MLflow run's coupled 70% SmolLM2 structure timed on the H200 (`surgeon report --kept`, attached to the run
# afterwards with `surgeon report --attach`); then batched decoding of the Llama-2-7B architecture (coupled 70%
# structure) with memory-efficient attention instead of cuDNN's SDPA, whose decode kernel took 0.5-1.7 ms per step.
set -u
MODEL=/root/smolhf
RES=/root/res4
mkdir -p $RES /root/g
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - T0) )); }
cp .gguf2/gguf.part.ab /root/g/ && bash benchmarks/gpu_convert.sh > $RES/convert.log 2>&1
step() { name=$1; lim=$2; shift 2; L=$(( $(left) - 5 )); [ $L -lt $lim ] && lim=$L; [ $lim -gt 20 ] || return 0
  timeout $lim python3 "$@" > $RES/$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  tar czf $OUT/res.tgz -C $RES . ; }
KEPT=benchmarks/results/gpu-2026-12-04/kept_a1_coupled70_run.json
step report_h200 200 -c "from surgeon.cli import main; raise SystemExit(main(['report', '--kept', '$KEPT', \
'--dense', '$MODEL', '--device', 'cuda', '--json', '$RES/report_h200.json']))"
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept benchmarks/results/gpu-2026-11-28b/kept_llama7b_obs70.json \
--dtype bf16 --compile --repeats 3 --decode-graph --eager-prefill --prefill-batch 1 --prefill-len 16 --check-decode"
step eff_b256 170 $M7 --sdpa efficient --decode-batch 256 --prompt-len 32 --decode-tokens 32 --json $RES/eff_b256.json
step eff_b64 150 $M7 --sdpa efficient --decode-batch 64 --prompt-len 32 --decode-tokens 64 --profile-steps 64 \
  --json $RES/eff_b64.json
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
