"""Accuracy of reduced-precision K-FAC factor matmuls (``gram_dtype``) against fp32, on a real model.

Estimates the factors twice over the same calibration windows (fp32 matmuls, then ``--gram`` matmuls; the sums are
fp32 in both), reports the relative Frobenius error ||A' - A||_F / ||A||_F of every factor per layer type, and runs
one structured shot from each set of factors on a copy of the model to see whether the same rows and columns are
removed (the costs, threshold and updates are the same code; only the factors differ) and what perplexity each
pruned copy has. ``--gram fp32 --test-batch-size 4`` gives the noise floor: fp32 factors summed in another order.

    OMP_NUM_THREADS=1 python benchmarks/gram_accuracy.py --model models/smollm2-135m \
        --calibration ../shared/data/a1/calibration_windows.npy --nsamples 4 --threads 1 --json out.json

Calls surgeon_core directly (no prefect/mlflow), so it also runs on the GPU machine's image (``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgeon_core.curvature as curvature_module  # noqa: E402
import surgeon_core.shot as shot_module  # noqa: E402
from surgeon_core.adapters import adapter_for, prunable_linears  # noqa: E402
from surgeon_core.curvature import KFACFactors, estimate_kfac  # noqa: E402
from surgeon_core.evaluate import perplexity  # noqa: E402
from surgeon_core.shot import PruneOptions, prune_shot  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - ref.double()) / torch.linalg.matrix_norm(ref.double()))


def _type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def factor_errors(test: KFACFactors, ref: KFACFactors) -> dict[str, dict]:
    """Per factor type ("A of q_proj/k_proj/v_proj input", "G of gate_proj", ...): mean and max relative error."""
    per: dict[str, list[float]] = {}
    members: dict[str, list[str]] = {}
    for name, key in ref.group_of.items():
        members.setdefault(key, []).append(_type(name))
    for key, M in ref.A.items():
        per.setdefault("A " + "/".join(members[key]), []).append(rel_error(test.A[key], M))
    for name, M in ref.G.items():
        per.setdefault("G " + _type(name), []).append(rel_error(test.G[name], M))
    return {k: {"mean": sum(v) / len(v), "max": max(v), "n": len(v)} for k, v in per.items()}


def legacy_gram(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The factor matmul before the fix (for --legacy): a bf16 result per batch, cuBLAS's default reductions."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if dtype is None or dtype == torch.float32:
            return x.T @ x
        y = x.to(dtype)
        return (y.T @ y).float()


def cuda_path_gram(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CUDA factor matmul's arithmetic on any device (for --emulate-cuda): inputs rounded to ``dtype``, products
    (exact in fp32 for bf16 inputs) and sums in fp32, an fp32 result; only the summation order differs."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if dtype is None or dtype == torch.float32:
            return x.T @ x
        y = x.to(dtype).float()
        return y.T @ y


@contextmanager
def given_factors(factors: KFACFactors):
    """prune_shot with these factors instead of a new curvature pass (both shots then differ only in the factors)."""
    real = shot_module.estimate_kfac

    def fake(*args, **kwargs):  # new dicts, same tensors: a shot pops each factor after use but never changes one
        return dataclasses.replace(factors, A=dict(factors.A), G=dict(factors.G), grads=dict(factors.grads))

    shot_module.estimate_kfac = fake
    try:
        yield
    finally:
        shot_module.estimate_kfac = real


def removed(model) -> dict[str, tuple[set, set, torch.Tensor]]:
    """Per linear: (all-zero rows, all-zero columns, zero mask)."""
    out = {}
    for name, lin in prunable_linears(model, adapter_for(model)).items():
        zero = lin.weight.detach() == 0
        rows = set(torch.nonzero(zero.all(dim=1)).flatten().tolist())
        cols = set(torch.nonzero(zero.all(dim=0)).flatten().tolist())
        out[name] = (rows, cols, zero)
    return out


def compare_shots(model, windows, ref: KFACFactors, test: KFACFactors, target: float, device: str,
                  eval_windows: torch.Tensor | None) -> dict:
    opts = PruneOptions(structure="structured", device=device)
    results, ppl = [], []
    for factors in (ref, test):
        m = copy.deepcopy(model)
        with given_factors(factors):
            rep = prune_shot(m, windows, options=opts, target_size=target)
        results.append((removed(m), rep))
        if eval_windows is not None:
            ppl.append(perplexity(m, eval_windows, device=device)["ppl"])
        del m
    (a, rep_a), (b, rep_b) = results
    same_masks = sum(torch.equal(a[n][2], b[n][2]) for n in a)
    removed_a = sum(len(a[n][0]) + len(a[n][1]) for n in a)
    sym_diff = sum(len(a[n][0] ^ b[n][0]) + len(a[n][1] ^ b[n][1]) for n in a)
    return {"target_size": target, "linears": len(a), "identical_masks": same_masks,
            "fraction_identical": same_masks / len(a), "rows_cols_removed_fp32": removed_a,
            "rows_cols_differing": sym_diff, "size_fp32": rep_a.achieved_size, "size_test": rep_b.achieved_size,
            "estimated_loss_fp32": rep_a.estimated_loss, "estimated_loss_test": rep_b.estimated_loss,
            "ppl_fp32": ppl[0] if ppl else None, "ppl_test": ppl[1] if ppl else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m")
    p.add_argument("--calibration", default="../shared/data/a1/calibration_windows.npy")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--gram", default="bf16", choices=["bf16", "fp16", "fp32"], help="matmul dtype under test")
    p.add_argument("--test-batch-size", type=int,
                   help="batch size of the run under test (default --batch-size); with --gram fp32 this measures "
                        "the noise floor: fp32 factors summed in another order")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"], help="model compute dtype (both runs)")
    p.add_argument("--targets", default="0.9875,0.9", help="structured shot target sizes (0.9875 = the first of "
                                                           "the paper's 40 shots to 50%%)")
    p.add_argument("--eval", default="../shared/data/a1/eval_windows.npy",
                   help="token windows for the perplexity after each shot ('' to skip)")
    p.add_argument("--eval-windows", type=int, default=8, help="use the first N evaluation windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--legacy", action="store_true", help="the run under test uses the matmul before the fix (a bf16 "
                                                          "result, reduced-precision split-K allowed on CUDA)")
    p.add_argument("--emulate-cuda", action="store_true", help="the run under test uses the CUDA path's arithmetic "
                                                                "(bf16 inputs, fp32 products, sums and result)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    windows = torch.from_numpy(np.load(args.calibration)[: args.nsamples].astype(np.int64))
    adapter = adapter_for(model)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    runs, seconds = {}, {}
    test_batch = args.test_batch_size or args.batch_size
    for label, dtype, batch in (("fp32", None, args.batch_size), ("test", DTYPES[args.gram], test_batch)):
        t0 = time.perf_counter()
        if label == "test" and args.legacy:
            curvature_module._gram = legacy_gram
        if label == "test" and args.emulate_cuda:
            curvature_module._gram = cuda_path_gram
        runs[label] = estimate_kfac(model, windows, adapter=adapter, batch_size=batch, device=args.device,
                                    autocast_dtype=autocast, gram_dtype=dtype)
        seconds[label] = time.perf_counter() - t0
        print(f"factors, {label} ({args.gram if label == 'test' else 'fp32'} matmuls, batch {batch}): "
              f"{seconds[label]:.1f} s", file=sys.stderr, flush=True)
    errors = factor_errors(runs["test"], runs["fp32"])
    evalw = torch.from_numpy(np.load(args.eval)[: args.eval_windows].astype(np.int64)) if args.eval else None
    dense_ppl = perplexity(model, evalw, device=args.device)["ppl"] if evalw is not None else None
    shots = [compare_shots(model, windows, runs["fp32"], runs["test"], float(t), args.device, evalw)
             for t in args.targets.split(",")]

    print(f"\nRelative Frobenius error of {args.gram} factor matmuls (batch {test_batch}) vs fp32 (batch "
          f"{args.batch_size}), {windows.shape[0]} windows x {windows.shape[1]} tokens, model compute {args.autocast}\n")
    print("| factor | mean | max | count |\n|---|---:|---:|---:|")
    for k, v in errors.items():
        print(f"| {k} | {v['mean']:.2e} | {v['max']:.2e} | {v['n']} |")
    ppl_note = f"; ppl on {evalw.shape[0]} x {evalw.shape[1]} eval tokens, dense {dense_ppl:.3f}" if dense_ppl else ""
    print(f"\nStructured shot from each set of factors{ppl_note}\n")
    print("| target size | linears with identical masks | rows+cols removed (fp32) | rows+cols differing | "
          "size fp32 / test | estimated loss fp32 / test | ppl fp32 / test |\n|---:|---:|---:|---:|---:|---:|---:|")
    for s in shots:
        ppl = f"{s['ppl_fp32']:.3f} / {s['ppl_test']:.3f}" if s["ppl_fp32"] else "-"
        print(f"| {s['target_size']:g} | {s['identical_masks']}/{s['linears']} ({s['fraction_identical']:.1%}) | "
              f"{s['rows_cols_removed_fp32']} | {s['rows_cols_differing']} | {s['size_fp32']:.5f} / "
              f"{s['size_test']:.5f} | {s['estimated_loss_fp32']:.5g} / {s['estimated_loss_test']:.5g} | {ppl} |")
    out = {"model": args.model, "calibration": args.calibration, "windows": list(windows.shape), "gram": args.gram,
           "legacy": args.legacy, "emulate_cuda": args.emulate_cuda,
           "batch_size": args.batch_size, "test_batch_size": test_batch,
           "autocast": args.autocast, "factor_errors": errors, "shots": shots, "seconds": seconds,
           "eval": args.eval or None, "eval_windows": list(evalw.shape) if evalw is not None else None,
           "dense_ppl": dense_ppl,
           "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
           "machine": platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
