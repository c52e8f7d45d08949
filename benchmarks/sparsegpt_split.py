"""Diagnostic: which part of SparseGPT's arithmetic moves its perplexity when fp32 becomes float64? Runs
``protocol.py`` (SparseGPT; same arguments otherwise) with the Hessian accumulated in one dtype and the solver (damped
Cholesky inverse, lazy-block OBS loop) run in another; the model's forward passes stay fp32 throughout.

    --split h32-s32   fp32 Hessian, fp32 solver (the product's default, the SparseGPT code's arithmetic)
    --split h64-s64   float64 Hessian and solver (= protocol.py --baseline-dtype fp64)
    --split h32-s64   fp32 Hessian, cast to float64 for the solver
    --split h64-s32   float64 Hessian, rounded to fp32 for the solver

Not a product option.

    python benchmarks/sparsegpt_split.py --split h32-s64 --model models/smollm2-135m \\
        --calibration ../shared/data/a1/calibration_windows.npy --eval ../shared/data/a1/eval_windows.npy \\
        --method sparsegpt --structure unstructured --target-size 0.5 --no-dense-eval --threads 2 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgeon_core.baselines as bl  # noqa: E402

SPLITS = {"h32-s32": ("fp32", torch.float32), "h64-s64": ("fp64", torch.float64),
          "h32-s64": ("fp32", torch.float64), "h64-s32": ("fp64", torch.float32)}

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--split" not in argv or argv[argv.index("--split") + 1] not in SPLITS:
        raise SystemExit(f"give --split, one of {', '.join(SPLITS)}")
    i = argv.index("--split")
    split = argv[i + 1]
    del argv[i:i + 2]
    hessian_dtype, solver_dtype = SPLITS[split]
    real = bl.sparsegpt_prune

    def sparsegpt_prune(W, H, *args, **kwargs):
        assert H.dtype == (torch.float64 if hessian_dtype == "fp64" else torch.float32)
        return real(W, H.to(solver_dtype), *args, **kwargs)

    bl.sparsegpt_prune = sparsegpt_prune
    import protocol

    raise SystemExit(protocol.main(argv + ["--baseline-dtype", hessian_dtype, "--tag", f"sparsegpt-{split}"]))
