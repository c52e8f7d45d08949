"""Micro-benchmark: decode attention kernels for one-token queries over a static KV cache (GPU).

The decode step of the speed benchmark (``surgeon/speed.py``, whole-step CUDA graph over a transformers
``StaticCache``) spends a fixed share of its time in attention over all kept heads: the cache holds
``prompt + steps`` positions and a boolean mask hides the ones not yet written. This times, per decoder layer, the
kernels that could run that attention for the Llama-2-7B shapes (32 heads of 128, bf16), each over its own K/V
buffers (one per layer, so no call reads another's data from L2), 32 calls captured as one CUDA graph, and checks
each against an fp32 reference:

- ``sdpa``: ``F.scaled_dot_product_attention`` with the boolean mask, default backend choice (cuDNN on Hopper GPUs);
- ``sdpa-efficient`` / ``sdpa-math``: the same, forced to one backend;
- ``flex``: ``torch.nn.attention.flex_attention`` compiled (its decoding kernel for short queries), the mask as a
  ``mask_mod`` over the same boolean tensor, block mask of ``--flex-block`` positions (blocks past the filled
  length are skipped);
- ``inductor``: q·Kᵀ, masked softmax and ·V written in torch and compiled by inductor.

Prints and writes (``--json``) microseconds per layer call and the max abs error against the fp32 reference.

    python benchmarks/micro/decode_attention.py --flex-block 32 --variants flex sdpa --batches 16 64 \
        --filled 64 96 --json out.json
    python benchmarks/micro/decode_attention.py --device cpu --batches 1 --layers 2 --variants sdpa   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def _graph_time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn()`` (warm-up on a side stream first); on a CPU (a
    smoke test of this script) plain calls."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 10)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache-len", type=int, default=96, help="static cache positions (prompt + decoded tokens)")
    p.add_argument("--filled", type=int, nargs="+", default=[33, 64, 96], help="positions written so far")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--flex-block", type=int, default=128,
                   help="block mask size in positions (blocks past the filled length are skipped); 0: no block "
                        "mask, the mask applied as a score_mod instead")
    p.add_argument("--variants", nargs="+", default=["sdpa", "sdpa-efficient", "sdpa-math", "flex", "inductor"])
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (no graphs)")
    a = p.parse_args()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device(a.device)
    torch.manual_seed(0)
    H, Hk, D, L = a.heads, a.kv_heads, a.head_dim, a.cache_len
    scale = 1.0 / math.sqrt(D)
    rows = []
    flex_attention = create_block_mask = None
    if "flex" in a.variants:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex_attention = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    def inductor_attn(q, k, v, valid):
        if Hk != H:
            k = k.repeat_interleave(H // Hk, dim=1)
            v = v.repeat_interleave(H // Hk, dim=1)
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        return (s.softmax(-1) @ v.float()).to(q.dtype)

    inductor_fn = torch.compile(inductor_attn, dynamic=False, fullgraph=True) if "inductor" in a.variants else None

    for b in a.batches:
        ks = [torch.randn(b, Hk, L, D, device=dev, dtype=torch.bfloat16) for _ in range(a.layers)]
        vs = [torch.randn(b, Hk, L, D, device=dev, dtype=torch.bfloat16) for _ in range(a.layers)]
        q = torch.randn(b, H, 1, D, device=dev, dtype=torch.bfloat16)
        for n in a.filled:
            valid = torch.zeros(b, L, dtype=torch.bool, device=dev)
            valid[:, :n] = True
            mask4 = valid[:, None, None, :]
            kf, vf = ks[0].float(), vs[0].float()
            if Hk != H:
                kf = kf.repeat_interleave(H // Hk, dim=1)
                vf = vf.repeat_interleave(H // Hk, dim=1)
            ref = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask4)
            kv_bytes = 2 * b * Hk * L * D * 2
            for name in a.variants:
                outs = [None] * a.layers
                try:
                    if name.startswith("sdpa"):
                        backend = {"sdpa": None, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                                   "sdpa-math": SDPBackend.MATH}[name]

                        def fn(backend=backend):
                            for i in range(a.layers):
                                if backend is None:
                                    outs[i] = F.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=mask4,
                                                                             enable_gqa=Hk != H)
                                else:
                                    with sdpa_kernel(backend):
                                        outs[i] = F.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=mask4,
                                                                                 enable_gqa=Hk != H)
                    elif name == "flex":
                        def mask_mod(bi, hi, qi, ki):
                            return valid[bi, ki]

                        def score_mod(score, bi, hi, qi, ki):
                            return torch.where(valid[bi, ki], score, -float("inf"))

                        bm = create_block_mask(mask_mod, b, None, 1, L, device=dev, BLOCK_SIZE=a.flex_block) \
                            if a.flex_block else None
                        sm = None if a.flex_block else score_mod

                        def fn(bm=bm, sm=sm):
                            for i in range(a.layers):
                                outs[i] = flex_attention(q, ks[i], vs[i], score_mod=sm, block_mask=bm, scale=scale,
                                                         enable_gqa=Hk != H)
                    else:
                        def fn():
                            for i in range(a.layers):
                                outs[i] = inductor_fn(q, ks[i], vs[i], valid)
                    sec = _graph_time(fn, a.repeats, dev)
                    err = float((outs[0].float() - ref).abs().max())
                    us = sec / a.layers * 1e6
                    row = {"batch": b, "filled": n, "variant": name, "us_per_layer": round(us, 2),
                           "kv_GBps_full_cache": round(kv_bytes / (us * 1e-6) / 1e9, 1), "max_abs_err": err}
                except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                    row = {"batch": b, "filled": n, "variant": name, "error": f"{type(e).__name__}: {str(e)[:1500]}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del ks, vs
        torch.cuda.empty_cache()

    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "heads": H, "kv_heads": Hk,
              "head_dim": D, "cache_len": L, "layers": a.layers, "flex_block": a.flex_block, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
