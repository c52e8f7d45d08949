"""Parameters, file size and inference speed of a dense model vs its materialized (really smaller) version.

The pruned structure comes from our own code, one of three ways:

- ``--pruned DIR``: a pruned (zeroed) Hugging Face folder, e.g. the output of ``surgeon prune --structure coupled``;
  it is materialized in memory with its own weights;
- ``--kept JSON``: the kept FFN units / heads / kv groups per layer written by ``benchmarks/protocol.py
  --save-kept`` (a run made elsewhere, e.g. on the GPU); the dense weights are sliced at those indices, so the
  shapes are exactly those of the run's materialized model (speed does not depend on the values);
- ``--prune-coupled SIZE``: a coupled K-FAC pruning (``--shots`` shots, random calibration tokens) of the model
  here, e.g. a random-weight Llama-2-7B architecture (``--arch``) on the GPU.

    python benchmarks/materialized_speed.py --model models/smollm2-135m --kept kept.json --threads 2 --json out.json
    python benchmarks/materialized_speed.py --arch llama-2-7b --prune-coupled 0.7 --dtype bf16 \
        --prefill-batch 8 --prefill-len 2048 --decode-batch 64 --json out.json

``--compile`` times both models without launch overhead, the same way (``surgeon.speed.CompiledRunner``):
prefill through ``torch.compile`` (``--compile-mode``), decode with a static KV cache and the one-token step
compiled with ``--decode-compile-mode`` (default "reduce-overhead": CUDA graphs on a GPU). Compilation happens
in the warm-up and is reported separately (``compile_seconds``), never in the timed repeats:

    python benchmarks/materialized_speed.py --arch llama-2-7b --kept kept.json --dtype bf16 --prefill-batch 8 \
        --prefill-len 2048 --decode-batch 64 --prompt-len 128 --decode-tokens 64 --repeats 5 --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.arch_shot import ARCHS  # noqa: E402
from surgeon import speed  # noqa: E402
from surgeon.materialized_export import (  # noqa: E402
    kept_from_json, kept_to_json, materialize_model, safetensors_bytes, save_materialized)
from surgeon_core.adapters import adapter_for  # noqa: E402
from surgeon_core.materialize import count_parameters, find_kept  # noqa: E402
from surgeon_core.shot import PruneOptions, linear_schedule, prune_shot  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weights_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.state_dict().values():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def check_decode(model, runner, batch: int, prompt_len: int, steps: int) -> dict:
    """The compiled runner's greedy decode against eager steps over the same static cache (same prompt): the
    fraction of equal tokens, the mean length of each sequence's identical prefix and the largest logit gap where
    both decodes had the same inputs (compiled kernels round differently, so bf16 near-ties may flip a token, after
    which that sequence's continuations part)."""
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(7))
    prompt = prompt.to(next(model.parameters()).device)
    _, tok, logit = runner.decode(prompt, steps, keep=True)
    eager = speed.CompiledRunner(model, compile_prefill=False, compile_decode=False)
    _, ref_tok, ref_logit = eager.decode(prompt, steps, keep=True)
    del eager
    # per sequence: positions up to and including its first differing token had identical inputs in both decodes
    differ = tok != ref_tok  # (batch, steps + 1)
    first = torch.where(differ.any(dim=1), differ.float().argmax(dim=1), torch.full_like(differ[:, 0], tok.shape[1],
                                                                                         dtype=torch.long))
    same_input = torch.arange(tok.shape[1], device=tok.device)[None, :] <= first[:, None]  # (batch, steps + 1)
    gap = (logit - ref_logit).abs().amax(dim=-1).transpose(0, 1)  # (batch, steps + 1)
    out = {"tokens_equal_fraction": (tok == ref_tok).double().mean().item(),
           "mean_identical_prefix": first.double().mean().item(),
           "max_logit_gap_same_inputs": gap[same_input].max().item(),
           "logit_scale": ref_logit.abs().max().item()}
    print(f"decode check: {out}", flush=True)
    return out


def profile_decode(model, runner, batch: int, prompt_len: int, steps: int, top: int = 25) -> dict:
    """One greedy decode of ``steps`` tokens under torch.profiler (the prompt pass is in it too: keep ``steps``
    large): GPU kernel time per step against wall time per step, and the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(5))
    prompt = prompt.to(next(model.parameters()).device)
    run = (lambda: runner.decode(prompt, steps)[0]) if runner is not None else \
        (lambda: speed._decode(model, prompt, steps)[0])
    run()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        wall = run()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:120], "us": t, "count": e.count})
    rows.sort(key=lambda r: -r["us"])
    kernel_us = sum(r["us"] for r in rows)
    out = {"steps": steps, "wall_ms_per_step": 1000 * wall / steps, "kernel_ms_per_step": kernel_us / 1000 / steps,
           "kernels_per_step": sum(r["count"] for r in rows) / steps, "top": rows[:top]}
    print(f"profile: wall {out['wall_ms_per_step']:.3f} ms/step, kernels {out['kernel_ms_per_step']:.3f} ms/step, "
          f"{out['kernels_per_step']:.0f} kernels/step", flush=True)
    for r in rows[:top]:
        print(f"  {r['us'] / 1000 / steps:8.4f} ms/step  x{r['count'] / steps:6.1f}  {r['name'][:100]}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="dense Hugging Face folder")
    src.add_argument("--arch", choices=ARCHS, help="random-weight architecture")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--pruned", help="pruned (zeroed) folder of the same model")
    how.add_argument("--kept", help="kept-units JSON from protocol.py --save-kept")
    how.add_argument("--prune-coupled", type=float, metavar="SIZE", help="prune here with coupled structures")
    p.add_argument("--method", default="llm-surgeon", help="method that chooses the coupled structure "
                   "(kobd: K-FAC diagonal costs without updates, no factor inverses: fits 7B on one GPU)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (with --compile: at least 1)")
    p.add_argument("--compile", action="store_true", help="compiled prefill; static KV cache and compiled decode "
                   "step (CUDA graphs on a GPU); the same for both models")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the prefill forward "
                   "(default, max-autotune-no-cudagraphs, reduce-overhead, max-autotune)")
    p.add_argument("--decode-compile-mode", help="torch.compile mode of the decode step (default: reduce-overhead "
                   "on a GPU, default on a CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    p.add_argument("--decode-graph", action="store_true", help="with --compile on a GPU: capture the whole decode "
                   "step (compiled forward, greedy pick, position advance) as one CUDA graph, replayed per token")
    p.add_argument("--sdpa", default="default", choices=["default", "efficient", "flash", "math"],
                   help="attention kernels on CUDA for both models: default (PyTorch's choice: cuDNN on an H200), "
                        "efficient (memory-efficient attention), flash (FlashAttention) or math (the others off)")
    p.add_argument("--decode-attention", default="sdpa", choices=["sdpa", "flex"],
                   help="attention of the decode steps for both models: sdpa (transformers' default, the mask over "
                        "the whole static cache) or flex (FlexAttention's decoding kernel, skipping cache blocks not "
                        "written yet; needs --compile)")
    p.add_argument("--flex-block", type=int, default=32, help="cache positions per FlexAttention block")
    p.add_argument("--eager-prefill", action="store_true", help="with --compile: keep the prefill eager (a "
                   "decode-only timing; saves its compile)")
    p.add_argument("--check-decode", action="store_true", help="after timing, decode once more with the compiled "
                   "runner (same shapes) and once eagerly with the same static cache: token agreement, max logit gap")
    p.add_argument("--profile-steps", type=int, default=0, help="after timing, profile one decode of this many "
                   "steps per model (torch.profiler): GPU kernel time per step and the top kernels")
    p.add_argument("--no-fullgraph", action="store_true", help="allow graph breaks from the start (otherwise "
                   "fullgraph is tried first and graph breaks are allowed only if it fails)")
    p.add_argument("--align", type=int, default=64, help="pad FFN widths to a multiple of this (1: no padding)")
    p.add_argument("--save", action="store_true", help="save both models (safetensors) to measure file sizes")
    p.add_argument("--save-kept", help="write the kept units (JSON) of the structure used")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.sdpa != "default" and device.type == "cuda":  # process-wide, before anything is compiled
        cuda_backends = torch.backends.cuda
        cuda_backends.enable_cudnn_sdp(False)
        cuda_backends.enable_flash_sdp(False)
        cuda_backends.enable_mem_efficient_sdp(args.sdpa == "efficient")
        cuda_backends.enable_flash_sdp(args.sdpa == "flash")
        cuda_backends.enable_math_sdp(True)

    def make_dense():
        if args.model:
            return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        torch.manual_seed(0)  # the same random weights every call
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **ARCHS[args.arch])).to(dtype).eval()

    t0 = time.perf_counter()
    pruned = make_dense()
    info: dict = {"load_seconds": time.perf_counter() - t0}
    adapter = adapter_for(pruned)
    layout = adapter.head_layout(pruned.config)
    if args.pruned:
        zeroed = AutoModelForCausalLM.from_pretrained(args.pruned, dtype=dtype).to(device)
        pruned.load_state_dict(zeroed.state_dict())
        del zeroed
        kept = find_kept(pruned, adapter, layout)
    elif args.kept:
        kept = kept_from_json(json.loads(Path(args.kept).read_text()))
    else:
        windows = torch.randint(0, pruned.config.vocab_size, (args.nsamples, args.seqlen),
                                generator=torch.Generator().manual_seed(0))
        opts = PruneOptions(method=args.method, structure="coupled", batch_size=args.batch_size, device=str(device),
                            autocast_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None)
        shots = []
        for i, size in enumerate(linear_schedule(args.prune_coupled, args.shots), start=1):
            rep = prune_shot(pruned, windows, options=opts, target_size=size, shot=i, num_shots=args.shots)
            shots.append({"shot": i, "target_size": size, "achieved_size": rep.achieved_size,
                          "seconds": rep.seconds})
            print(f"shot {i}: size {rep.achieved_size:.4f} {rep.seconds}", flush=True)
        info["prune_shots"] = shots
        if device.type == "cuda":
            info["prune_peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        kept = find_kept(pruned, adapter, layout)
    if args.save_kept:
        Path(args.save_kept).write_text(json.dumps(kept_to_json(kept)))
    # --kept: the dense weights sliced at the run's kept indices; otherwise the pruned weights' nonzero units
    pruned, report = materialize_model(pruned, kept if args.kept else None, align=args.align)
    pruned.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dense = make_dense()

    counts_dense = count_parameters(dense, adapter)
    counts_pruned = count_parameters(pruned, adapter)
    info["parameters"] = {"dense": counts_dense, "materialized": counts_pruned,
                          "prunable_fraction_kept": counts_pruned["prunable"] / counts_dense["prunable"],
                          "total_fraction_kept": counts_pruned["total"] / counts_dense["total"]}
    info["layers"] = report["layers"]
    info["weights_bytes"] = {"dense": weights_bytes(dense), "materialized": weights_bytes(pruned)}
    if args.save:
        with tempfile.TemporaryDirectory() as tmp:
            dense.save_pretrained(Path(tmp) / "dense")
            save_materialized(pruned, Path(tmp) / "pruned")
            info["file_bytes"] = {"dense": safetensors_bytes(Path(tmp) / "dense"),
                                  "materialized": safetensors_bytes(Path(tmp) / "pruned")}
    print(f"parameters {counts_dense['total']:,} -> {counts_pruned['total']:,}; prunable kept "
          f"{info['parameters']['prunable_fraction_kept']:.4f}", flush=True)

    runners: dict = {}
    res = speed.compare(dense, pruned, repeats=args.repeats, warmup=args.warmup, prefill_batch=args.prefill_batch,
                        prefill_len=args.prefill_len, decode_batch=args.decode_batch, prompt_len=args.prompt_len,
                        decode_tokens=args.decode_tokens,
                        progress=lambda r, n: print(f"repeat {r}/{n}", flush=True),
                        log=lambda msg: print(msg, flush=True), compile=args.compile,
                        compile_mode=args.compile_mode, decode_compile_mode=args.decode_compile_mode,
                        compile_backend=args.compile_backend, fullgraph=not args.no_fullgraph,
                        decode_graph=args.decode_graph, compile_prefill=not args.eager_prefill,
                        runners_out=runners, decode_attention=args.decode_attention, flex_block=args.flex_block)
    for k in ("dense", "pruned"):
        res[k].pop("runs")  # keep the JSON small; medians are what is reported
    if args.check_decode and args.compile:
        models = {"dense": dense, "pruned": pruned}
        info["decode_check"] = {k: check_decode(models[k], runners[k], args.decode_batch, args.prompt_len,
                                                args.decode_tokens) for k in models}
    if args.profile_steps:
        models = {"dense": dense, "pruned": pruned}
        info["decode_profile"] = {k: profile_decode(models[k], runners.get(k), args.decode_batch, args.prompt_len,
                                                    args.profile_steps) for k in models}
    out = {"model": args.model or args.arch, "align": args.align, "sdpa": args.sdpa, "source": args.pruned or args.kept or f"coupled {args.prune_coupled}",
           **info, "speed": res, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "loadavg": os.getloadavg(), "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip() or os.environ.get("SURGEON_COMMIT", "")}
    if args.compile:
        for k in ("dense", "pruned"):
            print(f"{k}: compile seconds {res[k]['compile_seconds']}, fullgraph {res[k]['fullgraph']}"
                  + (f", notes {res[k]['compile_notes']}" if res[k]["compile_notes"] else ""), flush=True)
        print(f"compile counters {res['settings']['compile_counters']}, CUDA graphs {res['settings']['cuda_graphs']}",
              flush=True)
    for work in ("prefill", "decode"):
        print(f"{work}: dense {res['dense'][f'{work}_tokens_per_s']:.1f} tok/s, pruned "
              f"{res['pruned'][f'{work}_tokens_per_s']:.1f} tok/s -> x{res[f'{work}_speedup']:.3f} "
              f"(ideal x{res['ideal_speedup']:.3f}, {100 * res[f'{work}_fraction_of_ideal']:.1f}% of ideal)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
