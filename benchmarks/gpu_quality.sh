#!/usr/bin/env bash
# Protocol A1 + P quality runs on the GPU machine (see BENCHMARKS.md). Expects the GGUF at /root/smol.gguf and the
# token files under $DATA (a1/, p/). Jobs run detached (setsid) and write JSON + logs to /root/res.
set -u
DATA=${DATA:-.gpudata}
MODEL=/root/smolhf
RES=/root/res
mkdir -p $RES
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if [ ! -f $MODEL/model.safetensors ]; then
  python3 - <<'PY'
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/root", gguf_file="smol.gguf", dtype=torch.float32)
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"): del m.config.quantization_config
m.save_pretrained("/root/smolhf")
print("converted")
PY
fi
run() { name=$1; shift; setsid nohup python3 benchmarks/protocol.py --model $MODEL --json $RES/$name.json "$@" > $RES/$name.log 2>&1 & }
A1="--calibration $DATA/a1/calibration_windows.npy --eval $DATA/a1/eval_windows.npy"
P="--calibration $DATA/p/calibration_windows.npy --eval $DATA/p/eval_ids.npy --eval-seqlen 2048"
# protocol P (paper protocol): structured 40 shots; unstructured / 2:4 5 shots
run p_surgeon_structured $P --method llm-surgeon --structure structured --target-size 0.5 --shots 40 \
    --eval-at 0.9,0.8,0.7,0.6,0.5 --batch-size 16 --autocast bf16 --tag P
run p_surgeon_unstructured5 $P --method llm-surgeon --structure unstructured --target-size 0.5 --shots 5 \
    --eval-at 0.5 --batch-size 16 --autocast bf16 --no-dense-eval --tag P
run p_surgeon_24_5 $P --method llm-surgeon --structure 2:4 --target-size 0.5 --shots 5 \
    --eval-at 0.5 --batch-size 16 --autocast bf16 --no-dense-eval --tag P
# protocol A1 (fp32 throughout), one after another
setsid nohup bash -c "
python3 benchmarks/protocol.py --model $MODEL --json $RES/a1_surgeon_structured.json $A1 --method llm-surgeon --structure structured --target-size 0.7 --shots 12 --eval-at 0.9,0.8,0.7 --batch-size 8 --tag A1 > $RES/a1_surgeon_structured.log 2>&1
python3 benchmarks/protocol.py --model $MODEL --json $RES/a1_kobd_structured.json $A1 --method kobd --structure structured --target-size 0.7 --shots 12 --eval-at 0.9,0.8,0.7 --batch-size 8 --no-dense-eval --tag A1 > $RES/a1_kobd_structured.log 2>&1
python3 benchmarks/protocol.py --model $MODEL --json $RES/a1_surgeon_unstructured5.json $A1 --method llm-surgeon --structure unstructured --target-size 0.5 --shots 5 --eval-at 0.5 --batch-size 8 --no-dense-eval --tag A1 > $RES/a1_surgeon_unstructured5.log 2>&1
python3 benchmarks/protocol.py --model $MODEL --json $RES/a1_surgeon_24_5.json $A1 --method llm-surgeon --structure 2:4 --target-size 0.5 --shots 5 --eval-at 0.5 --batch-size 8 --no-dense-eval --tag A1 > $RES/a1_surgeon_24_5.log 2>&1
for m in magnitude wanda sparsegpt; do for s in unstructured 2:4; do
  t=\$(echo \$s | tr -d :)
  python3 benchmarks/protocol.py --model $MODEL --json $RES/a1_\${m}_\$t.json $A1 --method \$m --structure \$s --target-size 0.5 --batch-size 8 --no-dense-eval --tag A1 > $RES/a1_\${m}_\$t.log 2>&1
done; done
python3 benchmarks/protocol.py --model $MODEL --json $RES/dense_wikitext_512.json --eval $DATA/p/eval_ids.npy --eval-seqlen 512 --method magnitude --structure structured --target-size 1.0 --tag dense512 > $RES/dense512.log 2>&1
" > $RES/a1_series.log 2>&1 &
echo launched
