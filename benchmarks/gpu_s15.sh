#!/usr/bin/env bash
# Fifteenth session, two calls on one GPU machine kept warm (results in /root/res15, returned as $OUT/res.tgz).
#   call A: STAGE=1 (carry .gguf1 and .whl): stage the first GGUF half and the gguf wheel, then issue 5's decode at
#     batch 4 and 1 on this machine: the Llama-2-7B architecture at the coupled-OBS 70% structure, bf16, compiled,
#     whole-step CUDA graph, FlexAttention decode steps against SDPA (batch 16 and 64 were measured in gpu_s14.sh).
#   call B: STAGE=2 (carry .gguf2 and .gpudata): convert SmolLM2 (benchmarks/gpu_convert.sh), then issue 3's open
#     question, where the reference's Wanda 2:4 (203.51) comes from: protocol P, batch 1, Wanda and SparseGPT with
#     --tf32 (fp32 matmuls run as TF32, a common harness default), and Wanda 2:4 in plain fp32 on this machine as the
#     control; then the 8 x 2048 prefill of the 7B structure on this machine.
#   calls C (STAGE=1 again on a fresh machine, then STAGE=3, carry .gguf2 and .gpudata with .gpudata/seeds from
#     benchmarks/p_seed_windows.py): the references' spread over calibration seeds 0/1/2 (p/README.md: WikiText-2 read
#     as is), like for like: Wanda and SparseGPT, 2:4 and 50%, batch 1, fp32, each seed's windows.
set -u
DATA=${DATA:-.gpudata}
MODEL=/root/smolhf
RES=${RES:-/root/res15}
source benchmarks/gpu_steps.sh
KEPT=benchmarks/results/gpu-2026-12-05/kept_llama7b_obs70_empty.json
M7="benchmarks/materialized_speed.py --arch llama-2-7b --kept $KEPT --dtype bf16 --compile"
DEC="$M7 --decode-graph --eager-prefill --prefill-batch 1 --prefill-len 16 --prompt-len 32 --decode-tokens 64"
if [ "${STAGE:-0}" != 1 ]; then  # stages 2 and 3 need SmolLM2
  bash benchmarks/gpu_convert.sh >> $RES/convert.log 2>&1
  echo "model ready at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
fi
if [ "${STAGE:-0}" = 1 ]; then
  mkdir -p /root/g /root/site && cp .gguf1/gguf.part.aa /root/g/ && pip install -q --no-deps --target /root/site .whl/gguf-*.whl
  echo "staged at $(( $(date +%s) - T0 )) s" >> $RES/timeline.txt
  [ -n "${STAGE_ONLY:-}" ] && exit 0
  step flex_b4 170 $DEC --repeats 5 --decode-batch 4 --decode-attention flex
  step sdpa_b4 110 $DEC --repeats 5 --decode-batch 4
  step flex_b1 170 $DEC --repeats 5 --decode-batch 1 --decode-attention flex
  step sdpa_b1 110 $DEC --repeats 5 --decode-batch 1
elif [ "${STAGE:-0}" = 3 ]; then
  NDE=""  # the first run also evaluates the dense model on the text read as is
  for ms in "wanda 2:4" "sparsegpt 2:4" "wanda unstructured" "sparsegpt unstructured"; do set -- $ms
    for seed in 0 1 2; do
      step seed${seed}_${1}_${2/:/} 70 benchmarks/protocol.py --model $MODEL --calibration $DATA/seeds/calib_seed$seed.npy \
        --eval $DATA/seeds/wikitext_raw_ids.npy --eval-seqlen 2048 --target-size 0.5 --batch-size 1 $NDE \
        --method $1 --structure $2 --tag P-seed$seed-raw
      NDE=--no-dense-eval
    done
  done
else
  P="benchmarks/protocol.py --model $MODEL --calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy
    --eval-seqlen 2048 --target-size 0.5 --batch-size 1 --no-dense-eval"
  step p_wanda24_tf32 90 $P --method wanda --structure 2:4 --tf32 --tag P-bs1-tf32
  step p_wanda50_tf32 90 $P --method wanda --structure unstructured --tf32 --tag P-bs1-tf32
  step p_wanda24_fp32 90 $P --method wanda --structure 2:4 --tag P-bs1
  step p_sparsegpt24_tf32 90 $P --method sparsegpt --structure 2:4 --tf32 --tag P-bs1-tf32
  step p_sparsegpt50_tf32 90 $P --method sparsegpt --structure unstructured --tf32 --tag P-bs1-tf32
  step prefill_8x2048 150 $M7 --prefill-batch 8 --prefill-len 2048 --decode-batch 1 --prompt-len 32 --decode-tokens 8 --repeats 3
fi
nvidia-smi > $RES/nvidia-smi.txt 2>&1; tar czf $OUT/res.tgz -C $RES .
cat $RES/timeline.txt; grep -h "decode:\|prefill:" $RES/*_b*.log $RES/prefill*.log 2>/dev/null | tail -12
grep -o '"ppl": [0-9.]*' $RES/p_*.json $RES/seed*.json 2>/dev/null; for f in $RES/p_*.log; do [ -f $f ] && tail -2 $f; done
