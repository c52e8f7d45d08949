"""Time of one K-FAC factor matmul (xᵀx) on the CPU: one full fp32 matmul against surgeon_core's upper block
triangle (``accumulate_input_factor(..., upper_only=True)``), and bf16 for reference, at SmolLM2's widths.

    python benchmarks/gram_blocks.py --threads 2 --tokens 2048 --widths 576 1536 --json out.json

Prints the median of ``--repeats`` timings per configuration (interleaved, so drifts of the machine's speed hit all
alike) and checks the triangle against the full product.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon_core.curvature import _upper_gram_blocks, accumulate_input_factor, symmetrize_upper_  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="rows of x (tokens of one calibration batch)")
    p.add_argument("--widths", type=int, nargs="+", default=[576, 1536])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for D in args.widths:
        x = torch.randn(args.tokens, D, generator=g)
        xb = x.bfloat16()
        acc_full = torch.zeros(D, D)
        acc_tri = torch.zeros(D, D)
        configs = {
            "fp32 full": lambda: acc_full.add_(x.T @ x),
            "fp32 upper triangle": lambda: accumulate_input_factor(acc_tri, x, bias=False, upper_only=True),
            "bf16 full (bf16 result)": lambda: (xb.T @ xb).float(),
        }
        times = {k: [] for k in configs}
        for f in configs.values():
            f()
        for _ in range(args.repeats):
            for k, f in configs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        check = accumulate_input_factor(None, x, bias=False, upper_only=True)
        symmetrize_upper_(check)
        err = float((check - x.T @ x).abs().max() / (x.T @ x).abs().max())
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = {"width": D, "tokens": args.tokens, "blocks": _upper_gram_blocks(x, None), "median_ms": med,
               "speedup_upper_vs_full": med["fp32 full"] / med["fp32 upper triangle"], "max_rel_error": err}
        rows.append(row)
        timings = ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
        print(f"D={D} tokens={args.tokens} blocks={row['blocks']}: {timings} -> upper triangle "
              f"{row['speedup_upper_vs_full']:.2f}x faster than full fp32 (max rel. error {err:.1e})")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": args.threads, "torch": torch.__version__,
                                               "machine": platform.processor() or platform.machine(),
                                               "commit": commit}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
