"""How much does arithmetic precision move SparseGPT? An fp32 model pruned with SparseGPT whose input statistics and
OBS math run in fp32 (the default, as the paper's script) or in float64 (``--math float64``: surgeon_core's
``baselines.math_dtype`` is overridden for this run only), evaluated in fp32.

    python benchmarks/sparsegpt_precision.py --model models/smollm2-135m \\
        --calibration ../shared/data/a1/calibration_windows.npy --eval ../shared/data/a1/eval_windows.npy \\
        --structure 2:4 --batch-size 4 --math float64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--structure", default="2:4")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--math", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import surgeon_core.baselines as baselines
    from surgeon_core import PruneOptions, prune
    from surgeon_core.evaluate import perplexity

    if args.math == "float64":
        baselines.math_dtype = lambda *_tensors: torch.float64  # statistics, Cholesky and OBS updates in float64
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))
    evalw = torch.from_numpy(np.load(args.eval).astype(np.int64))
    t0 = time.perf_counter()
    prune(model, calib, options=PruneOptions(method="sparsegpt", structure=args.structure,
                                             batch_size=args.batch_size), target_size=0.5)
    seconds = time.perf_counter() - t0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself stays fp32
    out = {"structure": args.structure, "math": args.math, "batch_size": args.batch_size, "prune_seconds": seconds,
           "ppl": perplexity(model, evalw, batch_size=4)["ppl"], "threads": args.threads, "torch": torch.__version__}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
