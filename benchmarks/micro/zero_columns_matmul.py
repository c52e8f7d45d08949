"""Micro-benchmark: does an fp32 matmul give the same result with zero columns left in (a zeroed model) as with
them dropped (the materialized model)? The floor under the check that a materialized model's logits match the
zeroed model's.

For SmolLM2's reduction widths (o_proj 576, down_proj 1536) and 30% of the input units zeroed: x @ W_zeroedᵀ
against x[:, kept] @ W[:, kept]ᵀ (``F.linear``, as the models call it), as the max absolute difference and in
units in the last place (ulp) of the largest result; the same in float64. Random data, CPU, seconds.

    python benchmarks/micro/zero_columns_matmul.py --threads 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F


def compare(tokens: int, k: int, n: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    kept = torch.rand(k, generator=g) >= 0.3
    x[:, ~kept] = 0
    w_zeroed = w.clone()
    w_zeroed[:, ~kept] = 0
    x, w, w_zeroed = x.to(dtype), w.to(dtype), w_zeroed.to(dtype)
    full = F.linear(x, w_zeroed)
    small = F.linear(x[:, kept].contiguous(), w[:, kept].contiguous())
    diff = (full - small).abs()
    ulp_of_max = torch.finfo(dtype).eps * float(full.abs().max())
    return {"tokens": tokens, "k": k, "kept": int(kept.sum()), "n": n, "dtype": str(dtype).replace("torch.", ""),
            "max_abs_diff": float(diff.max()), "max_abs_result": float(full.abs().max()),
            "max_diff_in_ulps_of_max_result": float(diff.max()) / ulp_of_max, "identical": bool(torch.equal(full, small))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for tokens in args.tokens:
            for k, n in ((576, 576), (1536, 576)):
                for dtype in (torch.float32, torch.float64):
                    r = {"threads": threads, **compare(tokens, k, n, dtype)}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    out = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "blas": "mkl" if torch.backends.mkl.is_available() else "other", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
