#!/usr/bin/env bash
# On the GPU machine: join the two GGUF halves carried in two calls (/root/g/gguf.part.aa, .ab), check the hash, and
# convert SmolLM2-135M (Q4_1 weights, de-quantized to fp32) to a Hugging Face folder at /root/smolhf.
# Needs the gguf package installed with `pip install --no-deps --target /root/site .whl/gguf-*.whl` in the first call.
# Run from the repo root in any call: it stages a carried .gguf2 half and does nothing once the model is there.
set -eu
[ -f /root/smolhf/model.safetensors ] && exit 0
mkdir -p /root/g
[ -f .gguf2/gguf.part.ab ] && cp .gguf2/gguf.part.ab /root/g/
cat /root/g/gguf.part.aa /root/g/gguf.part.ab > /root/smol.gguf
sha256sum /root/smol.gguf | cut -c1-16
PYTHONPATH=/root/site python3 - <<'PY'
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/root", gguf_file="smol.gguf", dtype=torch.float32)
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained("/root/smolhf")
print("converted")
PY
