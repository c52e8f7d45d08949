"""Micro-benchmark: where a blocked batched Cholesky of the element-update systems spends its time (GPU).

The chunk systems of the correlated element update (``surgeon_core.update``) are (B, 2000, 2000) float64 SPD
matrices, factorized by ``torch.linalg.cholesky_ex`` in one batched call. This times the parts a blocked
factorization would be built from (batched float64 products, small batched Cholesky factorizations, triangular
solves, triangular inverses) and two blocked variants (panel by triangular solve, panel by product with the inverted
diagonal block) against ``torch.linalg.cholesky_ex``, and prints seconds per call and TFLOP/s. Runs on a CPU too
(slowly; use a small ``--batch``).

    python benchmarks/micro/cholesky_parts.py --blocks 128 256 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, dev, repeats=3):
    fn()
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev) if dev.type == "cuda" else None
        best = min(best, time.perf_counter() - t)
    return best


def blocked(C, block, panel="solve"):
    n = C.shape[-1]
    L = C.clone()
    info = torch.zeros(C.shape[:-2], dtype=torch.int32, device=C.device)
    eye = torch.eye(block, dtype=C.dtype, device=C.device)
    for s in range(0, n, block):
        e = min(s + block, n)
        Lkk, inf = torch.linalg.cholesky_ex(L[..., s:e, s:e])
        info = torch.where((info == 0) & (inf != 0), inf + s, info)
        L[..., s:e, s:e] = Lkk
        if e < n:
            if panel == "solve":
                P = torch.linalg.solve_triangular(Lkk.mT, L[..., e:, s:e], upper=True, left=False)
            else:  # product with the inverse of the diagonal block
                inv = torch.linalg.solve_triangular(Lkk, eye[: e - s, : e - s].expand_as(Lkk), upper=False)
                P = L[..., e:, s:e] @ inv.mT
            L[..., e:, s:e] = P
            L[..., e:, e:].sub_(P @ P.mT)
    return L.tril_(), info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--blocks", type=int, nargs="*", default=[256, 512])
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev, B, n = torch.device(a.device), a.batch, a.n
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(B, n, n, device=dev, dtype=torch.float64, generator=g)
    S = X @ X.mT / n + torch.eye(n, device=dev, dtype=torch.float64)
    del X
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "B": B, "n": n, "parts": {}, "variants": {}}
    ref = torch.linalg.cholesky_ex(S)[0]
    out["variants"]["torch"] = {"s": timed(lambda: torch.linalg.cholesky_ex(S), dev)}
    for b in a.blocks:
        m = n - b
        A = torch.randn(B, m, b, device=dev, dtype=torch.float64, generator=g)
        small = S[:, :b, :b].contiguous()
        Lk = torch.linalg.cholesky(small)
        eye = torch.eye(b, device=dev, dtype=torch.float64).expand(B, b, b)
        parts = {
            "bmm_trailing": (lambda: A @ A.mT, 2 * B * m * m * b),
            "cholesky_block": (lambda: torch.linalg.cholesky_ex(small), B * b**3 / 3),
            "trsm_panel": (lambda: torch.linalg.solve_triangular(Lk.mT, A, upper=True, left=False), B * m * b * b),
            "tri_inverse": (lambda: torch.linalg.solve_triangular(Lk, eye, upper=False), B * b**3 / 3),
            "bmm_panel": (lambda: A @ Lk.mT, 2 * B * m * b * b),
        }
        for name, (fn, flops) in parts.items():
            t = timed(fn, dev)
            out["parts"][f"{name}_b{b}"] = {"s": t, "tflops": flops / t / 1e12}
        for panel in ("solve", "inverse"):
            t = timed(lambda: blocked(S, b, panel), dev)
            L, info = blocked(S, b, panel)
            out["variants"][f"blocked{b}_{panel}"] = {"s": t, "max_diff": float((L - ref).abs().max()),
                                                      "info_zero": bool((info == 0).all())}
    for k, v in out["variants"].items():
        v["tflops_equiv"] = B * n**3 / 3 / v["s"] / 1e12
    print(json.dumps(out, indent=1))
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
