"""Do the materialized model's logits equal the zeroed model's? Measured against fp32's own rounding noise.

Prunes SmolLM2 (or any Llama/OPT folder) with coupled structures (one shot, a few A1 calibration windows), then
compares on evaluation windows:

- materialized fp32 vs zeroed fp32 (the issue's check: max |Δlogit|);
- the same in float64 (0 means the two compute the same function exactly);
- each fp32 model vs the float64 zeroed model (its distance to the exact answer);
- the fp32 noise floor of the dense model itself: the same windows in one batch vs one at a time.

    python benchmarks/logit_match.py --model models/smollm2-135m --calibration ../shared/data/a1/calibration_windows.npy \
        --eval ../shared/data/a1/eval_windows.npy --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.materialize import materialize_model  # noqa: E402
from surgeon_core.shot import PruneOptions, prune  # noqa: E402


@torch.no_grad()
def logits(model, x: torch.Tensor, one_by_one: bool = False) -> torch.Tensor:
    if one_by_one:
        return torch.cat([model(input_ids=x[i: i + 1]).logits for i in range(x.shape[0])])
    return model(input_ids=x).logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--target-size", type=float, default=0.8)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))[: args.nsamples]
    x = torch.from_numpy(np.load(args.eval).astype(np.int64))[: args.windows, : args.seqlen]
    zeroed = copy.deepcopy(dense)
    prune(zeroed, calib, options=PruneOptions(structure="coupled", batch_size=2), target_size=args.target_size)
    mat, report = materialize_model(copy.deepcopy(zeroed), align=1)
    mat64, _ = materialize_model(copy.deepcopy(zeroed).double(), align=1)
    z32, m32 = logits(zeroed, x), logits(mat.eval(), x)
    z64, m64 = logits(zeroed.double(), x), logits(mat64.eval(), x)
    d32, d32_one = logits(dense, x), logits(dense, x, one_by_one=True)
    out = {
        "model": args.model, "target_size": args.target_size, "eval_tokens": list(x.shape),
        "parameters": {"before": report["parameters_before"]["total"], "after": report["parameters_after"]["total"]},
        "max_logit": float(z64.abs().max()),
        "materialized_vs_zeroed_fp32": float((m32 - z32).abs().max()),
        "materialized_vs_zeroed_fp64": float((m64 - z64).abs().max()),
        "zeroed_fp32_vs_exact": float((z32.double() - z64).abs().max()),
        "materialized_fp32_vs_exact": float((m32.double() - z64).abs().max()),
        "dense_fp32_batch_vs_one_by_one": float((d32 - d32_one).abs().max()),
        "argmax_agreement_fp32": float((m32.argmax(-1) == z32.argmax(-1)).float().mean()),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
