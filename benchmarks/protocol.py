"""Run one pruning configuration on exact token files (protocols A1 / P) and print what was measured.

Calls surgeon_core directly (no prefect/mlflow), so it also runs on the GPU machine's image.

    python benchmarks/protocol.py --model models/smollm2-135m --calibration ../shared/data/a1/calibration_windows.npy \
        --eval ../shared/data/a1/eval_windows.npy --method llm-surgeon --structure structured \
        --target-size 0.7 --shots 12 --eval-at 0.9,0.8,0.7 --json out.json

``--finetune-steps N`` fine-tunes the pruned model for N mask-preserving steps after every shot (the paper's
interleaved first-order correction, §3.5; lr ``--finetune-lr``, ``--ft-batch-size`` calibration windows per step,
a fresh AdamW each shot, constant rate), before that shot is evaluated; every pruned weight is checked to stay 0.

``--save-at 0.9,0.8,0.7 --save-dir DIR`` also saves the model after the shots nearest to those sizes
(``DIR/size-0.9``, ...: Hugging Face folders with the source's tokenizer), e.g. for ``surgeon eval --tasks``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon_core.evaluate import perplexity, windows_from_ids  # noqa: E402
from surgeon_core.finetune import FinetuneOptions, finetune, mask_violations, pruning_masks  # noqa: E402
from surgeon.utils import phase_logger  # noqa: E402  (stdlib only: runs on the GPU image)
from surgeon_core.shot import PruneOptions, linear_schedule, prune  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class _Stop(Exception):
    """Raised from the shot callback to end a timing run after --max-shots shots."""


def interleaved_correction(model, calib: torch.Tensor, options: FinetuneOptions, shot: int) -> dict:
    """Mask-preserving fine-tuning of the pruned model itself after a shot; stops the run if a pruned weight moved.
    Returns the row entry {"loss_first", "loss_last", "seconds"}."""
    masks = pruning_masks(model)
    fr = finetune(model, calib, options=options)
    if mask_violations(model, masks):
        raise SystemExit(f"shot {shot}: interleaved fine-tuning changed pruned weights")
    return {"loss_first": fr.losses[0], "loss_last": fr.losses[-1], "seconds": fr.seconds}


def peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return out


def load_windows(path: str, seqlen: int | None, max_windows: int | None) -> torch.Tensor:
    arr = torch.from_numpy(np.load(path).astype(np.int64))
    if arr.dim() == 2 and seqlen is None:
        seqlen = arr.shape[1]
    return windows_from_ids(arr, seqlen, max_windows)


def _stderr_log() -> logging.Logger:
    """Phase progress on stderr (stdout keeps the result lines)."""
    log = logging.getLogger("protocol")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--eval", required=True)
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--eval-max-windows", type=int)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--method", default="llm-surgeon")
    p.add_argument("--structure", default="structured")
    p.add_argument("--target-size", type=float, required=True)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--heldout", help="also evaluate held-out calibration-domain windows (.npy, from "
                   "benchmarks/heldout_windows.py) wherever --eval is evaluated: the criterion for choosing settings, "
                   "since the evaluation text must not be tuned on")
    p.add_argument("--heldout-max-windows", type=int)
    p.add_argument("--eval-at", default="", help="comma-separated target sizes (or 'all') to evaluate at")
    p.add_argument("--no-dense-eval", action="store_true")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--baseline-dtype", default="model", choices=["model", *DTYPES],
                   help="SparseGPT/Wanda: dtype of the input statistics and the mask/OBS math ('model': fp32, "
                        "float64 for --dtype fp64)")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"],
                   help="compute dtype of the calibration forward/backward (factors stay fp32)")
    p.add_argument("--gram", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the K-FAC factor matmuls (sums stay fp32)")
    p.add_argument("--save-kept", metavar="PREFIX", help="at each evaluated shot write PREFIX_<size>.json: the "
                   "kept FFN units / heads / kv groups per layer, for benchmarks/materialized_speed.py --kept")
    p.add_argument("--max-shots", type=int, help="stop after this many shots (timing runs)")
    p.add_argument("--eval-autocast", default="none", choices=["none", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-correlate", type=int)
    p.add_argument("--damping-a", type=float, default=0.01)
    p.add_argument("--damping-g", type=float)
    p.add_argument("--fisher-samples", type=int, default=1, help="labels drawn per token for --fisher sampled")
    p.add_argument("--fisher", default="empirical")
    p.add_argument("--structured-update", default="sum", choices=["sequential", "sum"])
    p.add_argument("--coupled-score", default="cost", choices=["cost", "per_param"],
                   help="coupled structures: greedy order by cost or by cost per parameter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--true-sequential", action="store_true", help="layer-wise baselines: calibrate q/k/v, o, "
                   "gate/up, down one after another, each on the outputs of the already-pruned ones")
    p.add_argument("--threads", type=int)
    p.add_argument("--tf32", action="store_true", help="on a GPU, let fp32 matmuls run as TF32 (a diagnostic: every "
                   "fp32 figure of the project has it off, PyTorch's default)")
    p.add_argument("--save-at", default="", help="comma-separated target sizes at which to save the model")
    p.add_argument("--save-dir", help="folder for --save-at models (one Hugging Face folder per size: size-0.9, ...)")
    p.add_argument("--update-concurrent", type=int, default=1, metavar="N", help="element updates: N batches of "
                   "same-shaped layers solved at once (CUDA: one stream each; same results, more memory)")
    p.add_argument("--checkpoint", metavar="DIR", help="after every shot keep the weights and the results so far in "
                   "DIR; a rerun with the same arguments resumes after the last finished shot (runs longer than one "
                   "GPU call: 40-shot unstructured / 2:4)")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="mask-preserving fine-tuning steps after every shot (interleaved correction), 0 = off")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="lr of the interleaved steps (AdamW, constant)")
    p.add_argument("--ft-batch-size", type=int, default=1, help="calibration windows per interleaved step")
    p.add_argument("--inverse-dtype", default="fp64", choices=["fp64", "fp32"], help="dtype of the damped factors' "
                   "Cholesky inverses (fp32: 2.4x faster on a CPU)")
    p.add_argument("--system-malloc", action="store_true", help="CPU: leave glibc's malloc as it is (default: keep "
                   "and reuse freed memory, surgeon.utils.keep_freed_memory, as `surgeon prune` does)")
    p.add_argument("--first-order", action="store_true", help="llm-surgeon / kobd: the first-order term (mean loss "
                   "gradient) in the costs and updates, scaled by --first-order-scale")
    p.add_argument("--first-order-scale", type=float, default=1e-3)
    p.add_argument("--json")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.save_at and not args.save_dir:
        p.error("--save-at needs --save-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_kept = False
    if args.device == "cpu" and not args.system_malloc:
        from surgeon.utils import keep_freed_memory

        malloc_kept = keep_freed_memory()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(device).eval()
    load_s = time.perf_counter() - t0
    calib = load_windows(args.calibration, None, args.nsamples) if args.calibration else None
    evalw = load_windows(args.eval, args.eval_seqlen, args.eval_max_windows)
    heldw = load_windows(args.heldout, None, args.heldout_max_windows) if args.heldout else None
    autocast = None if args.autocast == "none" else DTYPES[args.autocast]
    opts = PruneOptions(method=args.method, structure=args.structure, batch_size=args.batch_size,
                        autocast_dtype=autocast, gram_dtype=DTYPES[args.gram] if args.gram != "fp32" else None,
                        device=str(device), max_correlate=args.max_correlate,
                        damping_a=args.damping_a, damping_g=args.damping_g, fisher=args.fisher,
                        fisher_samples=args.fisher_samples, seed=args.seed,
                        structured_update=args.structured_update, true_sequential=args.true_sequential,
                        update_concurrent_batches=args.update_concurrent, coupled_score=args.coupled_score,
                        first_order=args.first_order, first_order_scale=args.first_order_scale,
                        inverse_dtype=DTYPES[args.inverse_dtype],
                        baseline_dtype=None if args.baseline_dtype == "model" else DTYPES[args.baseline_dtype])
    schedule = linear_schedule(args.target_size, args.shots) if not opts.layerwise else [args.target_size]
    if args.eval_at == "all":
        eval_sizes = set(range(len(schedule)))
    else:
        wanted = [float(x) for x in args.eval_at.split(",") if x]
        eval_sizes = {min(range(len(schedule)), key=lambda i: abs(schedule[i] - w)) for w in wanted}
        eval_sizes.add(len(schedule) - 1)

    save_sizes = {}  # shot index (0-based) -> requested size
    for w in (float(x) for x in args.save_at.split(",") if x):
        save_sizes[min(range(len(schedule)), key=lambda i: abs(schedule[i] - w))] = w

    def save(rep):
        from transformers import AutoTokenizer

        out = Path(args.save_dir) / f"size-{save_sizes[rep.shot - 1]:g}"
        model.save_pretrained(out)
        try:  # the tokenizer travels with the model where it can be loaded (not needed for the token-file protocols)
            AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
        except (OSError, ValueError) as exc:
            print(f"warning: tokenizer of {args.model} not saved with {out}: {exc}", file=sys.stderr, flush=True)
        (out / "protocol.json").write_text(json.dumps({"tag": args.tag, "method": args.method,
                                                       "structure": args.structure, "shot": rep.shot,
                                                       "target_size": rep.target_size,
                                                       "achieved_size": rep.achieved_size,
                                                       "options": opts.to_dict()}, indent=1))
        result.setdefault("saved", []).append(str(out))
        print(f"saved {out}", flush=True)

    def ev():
        def run(windows):
            return perplexity(model, windows, batch_size=args.eval_batch_size, device=device,
                              autocast_dtype=None if args.eval_autocast == "none" else DTYPES[args.eval_autocast])

        res = run(evalw)
        if heldw is not None:
            h = run(heldw)
            res = {**res, "heldout_ppl": h["ppl"], "seconds": res["seconds"] + h["seconds"]}
        return res

    result = {
        "tag": args.tag, "model": args.model, "method": args.method, "structure": args.structure,
        "target_size": args.target_size, "shots": args.shots, "options": opts.to_dict(),
        "calibration": args.calibration, "calibration_shape": list(calib.shape) if calib is not None else None,
        "eval": args.eval, "eval_shape": list(evalw.shape), "device": str(device),
        "heldout": args.heldout, "heldout_shape": list(heldw.shape) if heldw is not None else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "malloc_kept": malloc_kept,
        "load_seconds": load_s,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip() or os.environ.get("SURGEON_COMMIT", ""),
        "shots_report": [],
    }
    start_shot = 0
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    # what must match for a resume: everything that shapes the run (not the output paths)
    signature = {k: v for k, v in vars(args).items() if k not in ("json", "checkpoint", "save_dir", "tag", "threads",
                                                                   "max_shots", "eval_batch_size", "update_concurrent")}
    if ckpt is not None and (ckpt / "state.json").is_file():
        from safetensors.torch import load_model

        state = json.loads((ckpt / "state.json").read_text())
        if state["signature"] != signature:
            raise SystemExit(f"--checkpoint {ckpt} holds another run: "
                             f"{sorted(k for k in signature if state['signature'].get(k) != signature[k])} differ")
        load_model(model, str(ckpt / "model.safetensors"), device=str(device))
        start_shot = state["shot"]
        result = {**state["result"], "resumed": state["result"].get("resumed", []) + [
            {"after_shot": start_shot, "load_seconds": load_s}]}
        print(f"resumed from {ckpt} after shot {start_shot}", flush=True)

    def checkpoint(shot, elapsed):
        from safetensors.torch import save_model

        ckpt.mkdir(parents=True, exist_ok=True)
        tmp = ckpt / "model.safetensors.tmp"
        save_model(model, str(tmp))  # tied embeddings / head stored once
        tmp.replace(ckpt / "model.safetensors")  # weights first, then the state that names them
        tmp = ckpt / "state.json.tmp"
        tmp.write_text(json.dumps({"shot": shot, "signature": signature, "result": {**result,
                                                                                    "elapsed_seconds": elapsed}}))
        tmp.replace(ckpt / "state.json")

    if not args.no_dense_eval and start_shot == 0:
        d = ev()
        result["dense_ppl"] = d["ppl"]
        result["eval_seconds"] = d["seconds"]
        if "heldout_ppl" in d:
            result["dense_heldout_ppl"] = d["heldout_ppl"]
        print(f"dense ppl {d['ppl']:.3f} held-out {d.get('heldout_ppl', float('nan')):.3f} ({d['seconds']:.1f}s)",
              flush=True)

    def on_shot(rep):
        row = {"shot": rep.shot, "target_size": rep.target_size, "achieved_size": rep.achieved_size,
               "estimated_loss": rep.estimated_loss, "seconds": rep.seconds, "type_sizes": rep.type_sizes,
               "damping_escalations": rep.damping_escalations, **peak_memory(device)}
        if args.finetune_steps:  # interleaved correction on the pruned model itself, before evaluation / next shot
            row["interleaved"] = interleaved_correction(model, calib, FinetuneOptions(
                steps=args.finetune_steps, lr=args.finetune_lr, schedule="constant", batch_size=args.ft_batch_size,
                autocast_dtype=autocast, device=str(device), seed=args.seed + rep.shot), rep.shot)
        if args.save_kept and rep.shot - 1 in eval_sizes:
            from surgeon.materialized_export import kept_to_json
            from surgeon_core.adapters import adapter_for
            from surgeon_core.materialize import find_kept

            adapter = adapter_for(model)
            kept = find_kept(model, adapter, adapter.head_layout(model.config))
            Path(f"{args.save_kept}_{rep.target_size:.2f}.json").write_text(json.dumps(
                {"target_size": rep.target_size, "achieved_size": rep.achieved_size, **kept_to_json(kept)}))
            row["kept_sizes"] = [{k: len(v) for k, v in layer.items()} for layer in kept]
        if rep.shot - 1 in eval_sizes or opts.layerwise:
            e = ev()
            row["ppl"] = e["ppl"]
            row["eval_seconds"] = e["seconds"]
            if "heldout_ppl" in e:
                row["heldout_ppl"] = e["heldout_ppl"]
        result["shots_report"].append(row)
        if rep.shot - 1 in save_sizes:
            save(rep)
        secs = " ".join(f"{k}={v:.1f}s" for k, v in rep.seconds.items())
        print(f"shot {rep.shot}/{rep.num_shots} size {rep.achieved_size:.4f} (target {rep.target_size:.4f}) "
              f"{secs} ppl {row.get('ppl', float('nan')):.3f} held-out {row.get('heldout_ppl', float('nan')):.3f}",
              flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if ckpt is not None:
            checkpoint(rep.shot, prior + time.perf_counter() - t0)
        if args.max_shots and rep.shot >= args.max_shots:
            raise _Stop

    prior = result.pop("elapsed_seconds", 0.0)  # pruning seconds of the earlier calls of a resumed run
    t0 = time.perf_counter()
    try:
        prune(model, calib, options=opts, target_size=args.target_size, num_shots=args.shots, on_shot=on_shot,
              start_shot=start_shot, progress=phase_logger(_stderr_log()))
    except _Stop:
        result["stopped_after_shots"] = args.max_shots
    result["total_seconds"] = prior + time.perf_counter() - t0
    prune_s = [sum(v for k, v in r["seconds"].items()) for r in result["shots_report"]]
    result["seconds_per_shot"] = sum(prune_s) / max(1, len(prune_s))
    result.update(peak_memory(device))
    if "peak_gpu_gb" in result:  # interleaved fine-tuning resets CUDA's peak counter: keep the shots' peaks too
        result["peak_gpu_gb"] = max([result["peak_gpu_gb"]] + [r.get("peak_gpu_gb", 0.0)
                                                                for r in result["shots_report"]])
    print(json.dumps({k: result[k] for k in ("method", "structure", "seconds_per_shot", "total_seconds",
                                              "peak_rss_gb")}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
