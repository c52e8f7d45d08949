"""Micro-benchmark: time of one K-FAC factor matmul (xᵀx) on the CPU: one full fp32 matmul against surgeon_core's
upper block triangle (``accumulate_input_factor(..., upper_only=True)``), and bf16 for reference, at SmolLM2's
widths.
``--mkl-bf16`` adds MKL's bf16 x bf16 -> fp32 GEMM (``cblas_gemm_bf16bf16f32``, exported by torch's own CPU
library, called through ctypes and accumulating into the fp32 sum): the kernel a bf16 Gram with an fp32 result
would need, which torch's CPU ``mm`` does not offer (no ``out_dtype`` on the CPU).

    python benchmarks/micro/gram_blocks.py --threads 2 --tokens 2048 --widths 576 1536 --json out.json

Prints the median of ``--repeats`` timings per configuration (interleaved, so drifts of the machine's speed hit all
alike) and checks the triangle against the full product.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from surgeon_core.curvature import _gram_blocks, accumulate_input_factor, symmetrize_upper_  # noqa: E402


def mkl_bf16_gram():
    """``f(x, acc)``: acc += xᵀx for x (N, D) bf16 contiguous, acc (D, D) fp32, by MKL's cblas_gemm_bf16bf16f32."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    try:
        fn = lib.cblas_gemm_bf16bf16f32
    except AttributeError:
        raise SystemExit("this torch build exports no cblas_gemm_bf16bf16f32 (not linked with MKL)") from None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    row_major, trans, no_trans = 101, 112, 111

    def gram(x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        N, D = x.shape
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and acc.dtype == torch.float32 and acc.shape == (D, D)
        fn(row_major, trans, no_trans, D, D, N, 1.0, x.data_ptr(), D, x.data_ptr(), D, 1.0, acc.data_ptr(), D)
        return acc
    return gram


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="rows of x (tokens of one calibration batch)")
    p.add_argument("--widths", type=int, nargs="+", default=[576, 1536])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--mkl-bf16", action="store_true", help="also time MKL's bf16 x bf16 -> fp32 GEMM")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mkl = mkl_bf16_gram() if args.mkl_bf16 else None
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
        if mkl is not None:
            acc_mkl = torch.zeros(D, D)
            configs["MKL bf16 -> fp32 full"] = lambda: mkl(xb, acc_mkl)
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
        row = {"width": D, "tokens": args.tokens, "blocks": _gram_blocks(x.device, None, D), "median_ms": med,
               "speedup_upper_vs_full": med["fp32 full"] / med["fp32 upper triangle"], "max_rel_error": err}
        if mkl is not None:  # errors against the exact Gram of the bf16-rounded inputs
            exact = xb.double().T @ xb.double()
            scale = exact.abs().max()
            row["bf16_input_gram_rel_error"] = {
                "MKL bf16 -> fp32": float((mkl(xb, torch.zeros(D, D)).double() - exact).abs().max() / scale),
                "fp32 of the bf16 inputs": float(((xb.float().T @ xb.float()).double() - exact).abs().max() / scale),
                "bf16 result": float(((xb.T @ xb).double() - exact).abs().max() / scale)}
        rows.append(row)
        timings = ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
        print(f"D={D} tokens={args.tokens} blocks={row['blocks']}: {timings} -> upper triangle "
              f"{row['speedup_upper_vs_full']:.2f}x faster than full fp32 (max rel. error {err:.1e})")
        if mkl is not None:
            print("  error against the exact Gram of the bf16 inputs: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in row["bf16_input_gram_rel_error"].items()))
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": args.threads, "torch": torch.__version__,
                                               "machine": platform.processor() or platform.machine(),
                                               "commit": commit}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
