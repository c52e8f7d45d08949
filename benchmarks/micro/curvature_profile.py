"""Micro-benchmark: where a CPU curvature pass goes. One K-FAC batch of a real model under torch.profiler (top
operators by self time), then the same passes timed with the attention computed by other kernels (SDPA's CPU flash
kernel, SDPA's math path, eager attention). Needs a model folder and a calibration token file (.npy windows).

    python benchmarks/micro/curvature_profile.py --model models/smollm2-135m \
        --calibration data/protocols/a1/calibration_windows.npy --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from surgeon_core.adapters import adapter_for  # noqa: E402
from surgeon_core.curvature import estimate_kfac  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    w = torch.from_numpy(np.load(args.calibration).astype(np.int64))
    n = args.batch_size * args.batches
    out = {"threads": args.threads, "batch_size": args.batch_size, "batches": args.batches, "torch": torch.__version__,
           "attention": {}}
    for impl in ("sdpa", "sdpa-math", "eager", "sdpa"):  # sdpa twice: the spread of repeats
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=False,
                                                     attn_implementation="eager" if impl == "eager" else "sdpa").eval()
        kw = {"adapter": adapter_for(model), "batch_size": args.batch_size, "autocast_dtype": torch.bfloat16}
        ctx = sdpa_kernel(SDPBackend.MATH) if impl == "sdpa-math" else contextlib.nullcontext()
        with ctx:
            estimate_kfac(model, w[: args.batch_size], **kw)  # warm-up
            t = time.perf_counter()
            estimate_kfac(model, w[:n], **kw)
            out["attention"].setdefault(impl, []).append(time.perf_counter() - t)
        print(f"{impl}: {out['attention'][impl][-1]:.1f} s for {n} windows", flush=True)
        if impl == "sdpa" and "profile" not in out:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                estimate_kfac(model, w[: args.batch_size], **kw)
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ops)
            out["profile"] = {"total_s": total / 1e6, "top": [
                {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:15]]}
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
