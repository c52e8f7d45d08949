"""Coupled structures, greedy order by cost (the paper's rule) vs cost per parameter, on held-out text.

Prunes SmolLM2 (or any Llama/OPT folder) with coupled structures from A1 calibration windows, once per score, and
prints the achieved size, the kept fraction per linear type (heads / kv groups show in q/k/v/o) and the perplexity
on held-out Python-docs windows (``benchmarks/heldout_windows.py``: text no calibration window touches; not the
evaluation text).

    python benchmarks/coupled_score.py --model models/smollm2-135m --heldout /tmp/heldout/heldout_a1.npy \
        --nsamples 8 --target-size 0.8 --shots 1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon_core.evaluate import perplexity  # noqa: E402
from surgeon_core.shot import PruneOptions, prune  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", default="../shared/data/a1/calibration_windows.npy")
    p.add_argument("--heldout", required=True)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--heldout-windows", type=int, default=8)
    p.add_argument("--target-size", type=float, default=0.8)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--scores", default="cost,per_param")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))[: args.nsamples]
    held = torch.from_numpy(np.load(args.heldout).astype(np.int64))[: args.heldout_windows]
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    results = []
    for score in args.scores.split(","):
        model, t0 = copy.deepcopy(dense), time.perf_counter()
        reports = prune(model, calib, options=PruneOptions(structure="coupled", batch_size=4, coupled_score=score,
                                                           autocast_dtype=torch.bfloat16),
                        target_size=args.target_size, num_shots=args.shots)
        ppl = perplexity(model, held, batch_size=4)
        results.append({"score": score, "achieved_size": reports[-1].achieved_size,
                        "heldout_ppl": ppl["ppl"], "estimated_loss": reports[-1].estimated_loss,
                        "seconds": round(time.perf_counter() - t0, 1),
                        "type_sizes": {k: round(v, 4) for k, v in reports[-1].type_sizes.items()}})
        print(json.dumps(results[-1]), flush=True)
    out = {"model": args.model, "nsamples": args.nsamples, "heldout_windows": list(held.shape),
           "target_size": args.target_size, "shots": args.shots, "threads": args.threads, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
