"""Pruning with and without mask-preserving fine-tuning on exact token files (protocols P / A1), one process.

The model is pruned once along the linear schedule; at each size of ``--finetune-at`` the pruned model is evaluated
(WikiText-2 and held-out calibration-domain text), then a *copy* is fine-tuned for ``--final-steps`` steps at every
learning rate of ``--lrs`` and evaluated again (so "with" and "without" share the same pruning). Every copy is
checked: all pruned weights still exactly 0. ``--finetune-steps N`` also fine-tunes the pruned model itself for N
steps after every shot (the paper's interleaved correction); then the pruning differs from a run without it.
``--from-pruned DIR,DIR`` skips the pruning and fine-tunes models already pruned and saved (``protocol.py
--save-at ... --save-dir``), whose zero weights are the masks.

Calls surgeon_core directly (no prefect/mlflow), so it runs on the GPU machine's image.

    python benchmarks/finetune.py --model MODEL_DIR --calibration ../shared/data/p/calibration_windows.npy \\
        --eval ../shared/data/p/eval_ids.npy --eval-seqlen 2048 --heldout .gpudata/heldout/heldout_p.npy \\
        --structure structured --target-size 0.5 --shots 40 --finetune-at 0.7,0.5 --final-steps 200 \\
        --lrs 3e-5,1e-4,3e-4 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import DTYPES, interleaved_correction, load_windows, peak_memory  # noqa: E402

from surgeon_core.evaluate import perplexity  # noqa: E402
from surgeon_core.finetune import FinetuneOptions, finetune, mask_violations, pruning_masks  # noqa: E402
from surgeon_core.shot import PruneOptions, linear_schedule, model_size, prune  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--nsamples", type=int)
    p.add_argument("--eval", required=True)
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--eval-max-windows", type=int)
    p.add_argument("--heldout", help="held-out calibration-domain windows (.npy, 2-D), e.g. heldout_p.npy")
    p.add_argument("--heldout-max-windows", type=int)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--method", default="llm-surgeon")
    p.add_argument("--structure", default="structured")
    p.add_argument("--target-size", type=float, help="required unless --from-pruned")
    p.add_argument("--from-pruned", default="", help="comma-separated pruned model folders to fine-tune (no pruning)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--finetune-at", default="", help="sizes (comma-separated) to fine-tune a copy at; the final "
                                                     "size always")
    p.add_argument("--final-steps", type=int, default=200, help="fine-tuning steps of each copy")
    p.add_argument("--lrs", default="1e-4", help="learning rates (comma-separated): one copy each")
    p.add_argument("--finetune-steps", type=int, default=0, help="steps after every shot (interleaved), 0 = off")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="lr of the interleaved steps")
    p.add_argument("--validate-every", type=int, default=-1, help="with --heldout: check the held-out ppl every N "
                   "steps (0: at the start and the end) and keep the best weights; -1 = off")
    p.add_argument("--train", default="linears", choices=["linears", "norms", "both"])
    p.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "linear"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--ft-batch-size", type=int, default=8)
    p.add_argument("--ft-autocast", default="none", choices=["none", "bf16"],
                   help="fine-tuning compute dtype (fp32 master weights and AdamW state either way)")
    p.add_argument("--ft-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype the fine-tuned copy is held in (bf16: fp32 masters of the trained weights only)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--first-order", action="store_true", help="gradient term in the costs and updates")
    p.add_argument("--first-order-scale", type=float, default=1e-3, help="1 = the exact quadratic model (harmful)")
    p.add_argument("--batch-size", type=int, default=1, help="curvature pass batch")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"], help="curvature compute dtype")
    p.add_argument("--gram", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--max-correlate", type=int)
    p.add_argument("--damping-g", type=float)
    p.add_argument("--no-dense-eval", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    pruned_dirs = [d for d in args.from_pruned.split(",") if d]
    if args.target_size is None and not pruned_dirs:
        p.error("--target-size is required (or --from-pruned)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    calib = load_windows(args.calibration, None, args.nsamples)
    evalw = load_windows(args.eval, args.eval_seqlen, args.eval_max_windows)
    heldout = load_windows(args.heldout, None, args.heldout_max_windows) if args.heldout else None
    opts = PruneOptions(method=args.method, structure=args.structure, batch_size=args.batch_size,
                        autocast_dtype=None if args.autocast == "none" else DTYPES[args.autocast],
                        gram_dtype=None if args.gram == "fp32" else DTYPES[args.gram], device=str(device),
                        max_correlate=args.max_correlate, damping_g=args.damping_g, seed=args.seed,
                        first_order=args.first_order, first_order_scale=args.first_order_scale)
    schedule = ([] if pruned_dirs else
                [args.target_size] if opts.layerwise else linear_schedule(args.target_size, args.shots))
    ft_shots = {min(range(len(schedule)), key=lambda i: abs(schedule[i] - s)) + 1 for s in _floats(args.finetune_at)}
    ft_shots.add(len(schedule))
    lrs = _floats(args.lrs)
    ft_autocast = None if args.ft_autocast == "none" else DTYPES[args.ft_autocast]

    def ev(m, windows) -> float:
        return perplexity(m, windows, batch_size=args.eval_batch_size, device=device)["ppl"]

    def ft_options(steps: int, lr: float, seed: int) -> FinetuneOptions:
        return FinetuneOptions(steps=steps, lr=lr, train=args.train, schedule=args.schedule,
                               warmup_steps=min(args.warmup, steps), batch_size=args.ft_batch_size,
                               weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
                               autocast_dtype=ft_autocast, device=str(device), seed=seed)

    result = {"tag": args.tag, "args": vars(args), "options": opts.to_dict(), "schedule": schedule,
              "calibration_shape": list(calib.shape), "eval_shape": list(evalw.shape),
              "heldout_shape": list(heldout.shape) if heldout is not None else None, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "shots_report": [], "sizes": []}
    if not args.no_dense_eval:
        result["dense_ppl"] = ev(model, evalw)
        result["dense_heldout_ppl"] = ev(model, heldout) if heldout is not None else None
        print(f"dense ppl {result['dense_ppl']:.3f} held-out {result['dense_heldout_ppl']}", flush=True)

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    interleaved_seconds = 0.0

    def on_shot(rep):
        nonlocal interleaved_seconds
        row = {"shot": rep.shot, "target_size": rep.target_size, "achieved_size": rep.achieved_size,
               "seconds": rep.seconds, "extra": rep.extra}
        if args.finetune_steps:  # interleaved correction on the model itself, before the next shot
            row["interleaved"] = interleaved_correction(
                model, calib, ft_options(args.finetune_steps, args.finetune_lr, args.seed + rep.shot), rep.shot)
            interleaved_seconds += row["interleaved"]["seconds"]
        result["shots_report"].append(row)
        print(f"shot {rep.shot}/{len(schedule)} size {rep.achieved_size:.4f} "
              f"{' '.join(f'{k}={v:.1f}s' for k, v in rep.seconds.items())}", flush=True)
        if rep.shot in ft_shots:
            result["sizes"].append(measure(rep))
        write()

    def measure(rep) -> dict:
        masks = pruning_masks(model)
        out = {"shot": rep.shot, "size": rep.achieved_size, "ppl": ev(model, evalw),
               "heldout_ppl": ev(model, heldout) if heldout is not None else None,
               "pruned_entries": sum(int((~m).sum()) for m in masks.values()), "finetuned": []}
        print(f"  size {rep.achieved_size:.4f}: ppl {out['ppl']:.3f} held-out {out['heldout_ppl']}", flush=True)
        for lr in lrs if args.final_steps else []:  # --final-steps 0: pruning only (e.g. the first-order term)
            ft_model = copy.deepcopy(model)
            if args.ft_dtype != "fp32":
                ft_model.to(DTYPES[args.ft_dtype])
            check = (lambda m: ev(m, heldout)) if heldout is not None and args.validate_every >= 0 else None
            fr = finetune(ft_model, calib, options=ft_options(args.final_steps, lr, args.seed), validate=check,
                          validate_every=max(args.validate_every, 0))
            violations = mask_violations(ft_model, masks)
            row = {"lr": lr, "steps": args.final_steps, "seconds": fr.seconds, "tokens": fr.tokens,
                   "zero_violations": violations, "ppl": ev(ft_model, evalw),
                   "heldout_ppl": ev(ft_model, heldout) if heldout is not None else None,
                   "loss_first": fr.losses[0], "loss_last": fr.losses[-1],
                   "losses": fr.losses[:: max(1, len(fr.losses) // 50)], "state_gb": fr.state_bytes / 1e9,
                   "peak_gpu_gb": fr.peak_gpu_bytes / 1024**3 if fr.peak_gpu_bytes else None,
                   "trained_parameters": fr.trained_parameters, "validation": fr.extra.get("validation"),
                   "best_step": fr.extra.get("best_step"), **peak_memory(device)}
            if result.get("dense_ppl"):
                d = result["dense_ppl"]
                row["increase_ratio"] = (row["ppl"] - d) / (out["ppl"] - d) if out["ppl"] > d else math.nan
            out["finetuned"].append(row)
            print(f"  lr {lr:g}: ppl {row['ppl']:.3f} held-out {row['heldout_ppl']} ({fr.seconds:.1f} s, "
                  f"loss {fr.losses[0]:.3f}->{fr.losses[-1]:.3f}, zero violations {violations})", flush=True)
            del ft_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if heldout is not None and out["finetuned"]:  # the lr chosen on held-out calibration-domain text
            best = min(out["finetuned"], key=lambda r: r["heldout_ppl"])
            out["best_by_heldout"] = {"lr": best["lr"], "ppl": best["ppl"], "heldout_ppl": best["heldout_ppl"]}
        return out

    t0 = time.perf_counter()
    if pruned_dirs:
        del model
        for d in pruned_dirs:  # `measure` reads the enclosing `model`
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
            result["sizes"].append(measure(SimpleNamespace(shot=0, achieved_size=model_size(model)[0])))
            result["sizes"][-1]["from"] = d
            write()
    else:
        prune(model, calib, options=opts, target_size=args.target_size, num_shots=args.shots, on_shot=on_shot)
    result["total_seconds"] = time.perf_counter() - t0
    result["interleaved_seconds"] = interleaved_seconds
    result.update(peak_memory(device))
    all_zero = all(r["zero_violations"] == 0 for s in result["sizes"] for r in s["finetuned"])
    result["all_pruned_weights_zero"] = all_zero
    write()
    print(json.dumps({"sizes": [{k: s[k] for k in ("size", "ppl", "heldout_ppl")} | {
        "finetuned": [{k: r[k] for k in ("lr", "ppl", "heldout_ppl", "seconds")} for r in s["finetuned"]]}
        for s in result["sizes"]], "all_pruned_weights_zero": all_zero}), flush=True)
    return 0 if all_zero else 1


if __name__ == "__main__":
    raise SystemExit(main())
