"""How far are K-FAC factors whose Gram matmuls run in bf16 (result rounded to bf16 per batch, summed in fp32) from
the fp32 ones, measured against the damping that the costs add? And how much faster is the curvature pass?

One full curvature pass over the calibration windows (bf16 autocast forward/backward, as the A1 CPU runs) with fp32
factor matmuls (the CPU's upper-block-triangle path) and once with bf16 ones; per factor: the spectral norm of the
difference divided by the damping λ·mean(diag) (above 1: the rounding moves the damped factor by more than the
damping; the costs' inverses then change), and whether the bf16 factor is still positive definite once damped.

    python benchmarks/gram_bf16_error.py --model models/smollm2-135m --calibration ../shared/data/a1/calibration_windows.npy \\
        --threads 2 --json out.json
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

from surgeon_core.adapters import adapter_for  # noqa: E402
from surgeon_core.curvature import estimate_kfac  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--damping", type=float, default=0.01, help="relative damping of A and G (structured default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    adapter = adapter_for(model)
    windows = torch.from_numpy(np.load(args.calibration).astype(np.int64))
    factors, seconds = {}, {}
    for name, gram in (("fp32", None), ("bf16", torch.bfloat16)):
        t = time.perf_counter()
        factors[name] = estimate_kfac(model, windows, adapter=adapter, batch_size=args.batch_size,
                                      autocast_dtype=torch.bfloat16, gram_dtype=gram)
        seconds[name] = time.perf_counter() - t
        print(f"curvature pass, {name} factor matmuls: {seconds[name]:.1f} s", flush=True)
    rows = []
    for kind in ("A", "G"):
        for key, exact in getattr(factors["fp32"], kind).items():
            exact, rounded = exact.double(), getattr(factors["bf16"], kind)[key].double()
            damp = args.damping * torch.diagonal(rounded).mean()
            damped = rounded.clone()
            damped.diagonal().add_(damp)
            rows.append({"factor": kind, "name": key, "width": exact.shape[0],
                         "error_over_damping": float(torch.linalg.eigvalsh(exact - rounded).abs().max() / damp),
                         "positive_definite": int(torch.linalg.cholesky_ex(damped)[1]) == 0})
    by_type: dict = {}
    for r in rows:
        by_type.setdefault(f"{r['factor']}[{r['name'].rsplit('.', 1)[-1]}] {r['width']}", []).append(r["error_over_damping"])
    summary = {k: {"median": float(np.median(v)), "max": float(max(v))} for k, v in sorted(by_type.items())}
    out = {"model": args.model, "windows": list(windows.shape), "batch_size": args.batch_size, "threads": args.threads,
           "torch": torch.__version__, "seconds": seconds, "damping": args.damping,
           "not_positive_definite": [f"{r['factor']}[{r['name']}]" for r in rows if not r["positive_definite"]],
           "error_over_damping": summary, "factors": rows}
    print(json.dumps({k: out[k] for k in ("seconds", "not_positive_definite", "error_over_damping")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
