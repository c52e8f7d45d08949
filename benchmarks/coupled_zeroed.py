"""Write a zeroed (not materialized) coupled-pruned model folder quickly, for `surgeon materialize` measurements.

One shot of coupled LLM Surgeon on the first few calibration windows (as ``logit_match.py`` prunes), saved with the
tokenizer:

    python benchmarks/coupled_zeroed.py --model models/smollm2-135m --calibration ../shared/data/a1/calibration_windows.npy \
        --output /tmp/zeroed80
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon_core.shot import PruneOptions, prune  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--target-size", type=float, default=0.8)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))[: args.nsamples]
    prune(model, calib, options=PruneOptions(structure="coupled", batch_size=2), target_size=args.target_size)
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
