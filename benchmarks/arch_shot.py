"""Time one pruning shot on a randomly initialised architecture (speed/memory only; quality is not the point).

    python benchmarks/arch_shot.py --arch smollm2-135m --structure unstructured --target-size 0.5 \
        --nsamples 16 --seqlen 2048 --json out.json

Data-parallel over the GPUs of one machine (curvature shared out and all-reduced, rank 0 solves and broadcasts):

    torchrun --standalone --nproc-per-node 2 benchmarks/arch_shot.py --arch llama-2-7b ... --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon_core.adapters import adapter_for  # noqa: E402
from surgeon_core.curvature import estimate_kfac  # noqa: E402
from surgeon_core.shot import PruneOptions, prune_shot  # noqa: E402

ARCHS = {
    # Llama family shapes (GQA where the real model has it)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
}


def forward_backward_seconds(model, windows, opts, device) -> float:
    """The curvature pass without its hooks: the same batches, autocast and activation-only gradients."""
    from surgeon_core.lm import sequence_nll

    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    n, bs = windows.shape[0], opts.batch_size
    if dist.is_initialized():  # this rank's share, as in the curvature pass
        r, w = dist.get_rank(), dist.get_world_size()
        from surgeon_core.distributed import share
        windows = windows[share(n, r, w)]
        n = windows.shape[0]
    try:
        for warm in (True, False):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, bs if warm else n, bs):
                batch = windows[i:i + bs].to(device)
                with torch.autocast(device.type, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None):
                    loss = sequence_nll(model, batch).sum()
                loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        emb.remove()
        for p_, f in flags.items():
            p_.requires_grad_(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="smollm2-135m", choices=ARCHS)
    p.add_argument("--structure", default="structured")
    p.add_argument("--method", default="llm-surgeon")
    p.add_argument("--target-size", type=float, default=0.9)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--autocast", default="bf16", choices=["none", "bf16"])
    p.add_argument("--max-correlate", type=int)
    p.add_argument("--gram", default="fp32", choices=["fp32", "bf16"], help="dtype of the K-FAC factor matmuls "
                   "(sums stay fp32)")
    p.add_argument("--factor-device", help="where the K-FAC factors live; 'spread': over every visible GPU (one "
                   "process), for models whose fp32 factors exceed one GPU (13B)")
    p.add_argument("--curvature-only", action="store_true", help="time the curvature pass alone (no costs or "
                   "update) and report its peak memory (GPU, and the process's peak RSS)")
    p.add_argument("--checkpoint-layers", action="store_true", help="curvature pass with decoder-layer activation "
                   "checkpointing (less memory, same factors)")
    p.add_argument("--update-batch-layers", type=int, default=0, help="same-shaped layers per batched element "
                   "update (0: all on the GPU)")
    p.add_argument("--update-concurrent", type=int, default=1, metavar="N", help="element updates: N batches of "
                   "same-shaped layers solved at once (CUDA: one stream each; same results, more memory)")
    p.add_argument("--fb-baseline", action="store_true", help="first time a plain forward+backward pass over the "
                   "same tokens (no hooks), so the curvature time splits into forward/backward and accumulation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: one GPU per process (gloo on the CPU)
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **ARCHS[args.arch])).to(dtype).eval()
    windows = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen))
    if world > 1:  # the same random model on every rank
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    opts = PruneOptions(method=args.method, structure=args.structure, batch_size=args.batch_size,
                        autocast_dtype=torch.bfloat16 if args.autocast == "bf16" else None, device=str(device),
                        max_correlate=args.max_correlate,
                        gram_dtype=torch.bfloat16 if args.gram == "bf16" else None,
                        update_batch_layers=args.update_batch_layers, factor_device=args.factor_device,
                        update_concurrent_batches=args.update_concurrent,
                        checkpoint_layers=args.checkpoint_layers)
    fb_seconds = forward_backward_seconds(model, windows, opts, device) if args.fb_baseline else None
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    t0 = time.perf_counter()
    marks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:  # ~10 lines per phase in the log, with the clock
        step = max(1, total // 10)
        if done == total or done // step != marks.get(phase, -1):
            marks[phase] = done // step
            print(f"[{time.perf_counter() - t0:7.1f} s] {phase} {done}/{total}", file=sys.stderr, flush=True)

    if args.curvature_only:
        factors = estimate_kfac(model, windows, adapter=adapter_for(model), batch_size=opts.batch_size,
                                device=device, factor_device=opts.factor_device or device,
                                autocast_dtype=opts.autocast_dtype, gram_dtype=opts.gram_dtype,
                                checkpoint_layers=opts.checkpoint_layers,
                                progress=lambda i, n: progress("curvature", i, n))
        rep = SimpleNamespace(seconds=dict(factors.seconds), achieved_size=1.0)
    else:
        rep = prune_shot(model, windows, options=opts, target_size=args.target_size, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"arch": args.arch, "structure": args.structure, "method": args.method, "target_size": args.target_size,
           "tokens": args.nsamples * args.seqlen, "seconds": rep.seconds, "total_seconds": time.perf_counter() - t0,
           "achieved_size": rep.achieved_size,
           "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else None,
           "peak_gpu_gb_per_device": [torch.cuda.max_memory_allocated(i) / 1024**3
                                      for i in range(torch.cuda.device_count())] if device.type == "cuda" else None,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "processes": world, "gram": args.gram, "factor_device": args.factor_device,
           "gpus": torch.cuda.device_count() if device.type == "cuda" else 0, "batch_size": args.batch_size,
           "forward_backward_seconds": fb_seconds, "curvature_only": args.curvature_only,
           "checkpoint_layers": args.checkpoint_layers,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if fb_seconds is not None:  # curvature = forward/backward + factor accumulation
        out["accumulation_seconds"] = rep.seconds["curvature"] - fb_seconds
    if world > 1:
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    print(json.dumps(out), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
