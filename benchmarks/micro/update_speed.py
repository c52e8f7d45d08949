"""Micro-benchmark: speed of the correlated OBS element update (``obs_update_elements_batched``) on random SPD
factors.

--arch smollm2-135m (default; 30 decoder layers): q 576x576, k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536;
one batch per layer type, as ``surgeon_core.shot`` groups them. For every --drop-frac and layer type:

* ``total_s``: the real function, timed once after a warm-up (no extra synchronisation inside);
* ``phases``: a separate instrumented run that synchronises after each phase (chunking = host bookkeeping and
  copies, build_C = gathers of the Q x Q systems, cholesky = batched float64 Cholesky + solve, update = ΔW);
* with --reference-layers N: the readable update of ``surgeon_core.reference.correlated_element_update`` (one
  layer at a time, float64, ΔW as an (R, Q) x (Q, C') product) on the first N layers, timed the same way, and the
  largest difference from the batched result relative to max |W|.

Then ``torch.linalg.cholesky_ex`` on (B, n, n) SPD matrices (default 2000, the chunk size): batched float64 and
float32, a Python loop of single-matrix calls, a blocked Cholesky whose trailing updates are batched matmuls
(``--chol-blocks``, checked against the library's factor), and the solve with one right-hand side (the library's
two triangular solves and ``torch.cholesky_solve``); on CUDA once per linalg backend (default, cusolver, magma), to
see what the batched solvers do. ``--solve cholesky_solve`` runs the updates with ``torch.cholesky_solve`` instead.

    # one GPU:
    python benchmarks/micro/update_speed.py --device cuda --drop-frac 0.1 0.5 --reference-layers 8 --json out.json
    # one GPU: more systems per call, or the layer shapes' batches on CUDA streams of their own:
    python benchmarks/micro/update_speed.py --device cuda --drop-frac 0.5 --concurrent --chol-scan 1 2 4 7 \
        --json out.json
    # CPU, small:
    OMP_NUM_THREADS=2 python benchmarks/micro/update_speed.py --device cpu --layers 2 --drop-frac 0.1 0.4 \
        --reference-layers 2 --chol-batch 2 --json out.json

Errors in one measurement are recorded (``error``) and the rest still runs; the JSON is rewritten after each one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import surgeon_core.linalg as linalg  # noqa: E402
from surgeon_core.reference import correlated_element_update  # noqa: E402
from surgeon_core.update import (_ChunkPlan, _update_elements, obs_update_elements_batched,  # noqa: E402
                                 obs_update_elements_concurrent)

# layer type -> (rows R = out features, weight columns C = in features)
SMOLLM2_SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                  "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
LLAMA2_7B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                    "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
ARCH_SHAPES = {"smollm2-135m": SMOLLM2_SHAPES, "llama-2-7b": LLAMA2_7B_SHAPES}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def reference_update(W, drop, G_inv, A_inv, *, max_correlate: int) -> torch.Tensor:
    """The reference update of every layer of a batch, one after another."""
    return torch.stack([correlated_element_update(W[b], drop[b], G_inv[b], A_inv[b], max_correlate)
                        for b in range(W.shape[0])])


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def random_spd(B: int, n: int, dev: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Well-conditioned SPD matrices standing in for the damped inverse factors."""
    X = torch.randn(B, n, n, device=dev, dtype=torch.float32, generator=gen)
    S = torch.bmm(X, X.mT) / n + 0.5 * torch.eye(n, device=dev)
    return S.to(dtype)


def make_problem(B: int, R: int, C: int, frac: float, pattern: str, bias: bool, dev, dtype, seed: int):
    gen = torch.Generator(device=dev).manual_seed(seed)
    Cp = C + int(bias)
    W = torch.randn(B, R, Cp, device=dev, dtype=dtype, generator=gen)
    G_inv, A_inv = random_spd(B, R, dev, dtype, gen), random_spd(B, Cp, dev, dtype, gen)
    if pattern == "unstructured":
        drop = torch.rand(B, R, C, device=dev, generator=gen) < frac
    else:  # n:m, frac ignored
        n, m = (int(x) for x in pattern.split(":"))
        scores = torch.rand(B, R, C // m, m, device=dev, generator=gen)
        drop = torch.zeros(B, R, C // m, m, dtype=torch.bool, device=dev)
        drop.scatter_(-1, scores.argsort(-1)[..., :n], True)
        drop = drop.view(B, R, C)
    return W, drop, G_inv, A_inv


def bench_update(args, dev, dtype, results, save) -> None:
    for frac in args.drop_frac:
        tot = {"total_s": 0.0, "phases": {}, "reference_s": 0.0, "batched_on_reference_layers_s": 0.0}
        for i, (name, (R, C)) in enumerate(ARCH_SHAPES[args.arch].items()):
            if args.shapes and name not in args.shapes:
                continue
            rec = {"frac": frac, "layer_type": name, "R": R, "C": C, "layers": args.layers,
                   "solve_dtype": args.solve_dtype}
            results["update"].append(rec)
            try:
                W, drop, G_inv, A_inv = make_problem(args.layers, R, C, frac, args.pattern, args.bias, dev, dtype,
                                                     args.seed + i)
                plan = _ChunkPlan(drop, args.max_correlate)
                if plan.steps:
                    rec.update(steps=plan.steps, removed=int(drop.sum()), Q_max=max(plan.Q),
                               rows_per_chunk_mean=sum(p * k for p, k in zip(plan.P, plan.k)) / sum(plan.k),
                               entries_per_chunk_mean=sum(q * k for q, k in zip(plan.Q, plan.k)) / sum(plan.k))
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                sd = DTYPES[args.solve_dtype]
                if args.warmup:  # kernels, cuSOLVER handles, allocator: one layer
                    obs_update_elements_batched(W[:1], drop[:1], G_inv[:1], A_inv[:1],
                                                max_correlate=args.max_correlate, solve_dtype=sd)
                batched, rec["total_s"] = timed(lambda: obs_update_elements_batched(
                    W, drop, G_inv, A_inv, max_correlate=args.max_correlate, solve_dtype=sd), dev)
                if dev.type == "cuda":
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                phases: dict = {}
                _, rec["instrumented_s"] = timed(lambda: _update_elements(
                    W, drop, G_inv, A_inv, max_correlate=args.max_correlate, phases=phases, solve_dtype=sd), dev)
                rec["phases"] = phases
                if sd != torch.float64:
                    exact, rec["fp64_s"] = timed(lambda: obs_update_elements_batched(
                        W, drop, G_inv, A_inv, max_correlate=args.max_correlate), dev)
                    rec["max_rel_diff_vs_fp64"] = float((batched - exact).abs().max() / W.abs().max())
                    del exact
                tot["total_s"] += rec["total_s"]
                for k, v in phases.items():
                    tot["phases"][k] = tot["phases"].get(k, 0.0) + v
                n_ref = min(args.reference_layers, args.layers)
                if n_ref:
                    sub = (W[:n_ref], drop[:n_ref], G_inv[:n_ref], A_inv[:n_ref])
                    batched_sub, rec["batched_on_reference_layers_s"] = timed(lambda: obs_update_elements_batched(
                        *sub, max_correlate=args.max_correlate), dev)
                    ref, rec["reference_s"] = timed(lambda: reference_update(
                        *sub, max_correlate=args.max_correlate), dev)
                    scale = float(W[:n_ref].abs().max())
                    rec["reference_layers"] = n_ref
                    rec["max_rel_diff_vs_reference"] = float((batched_sub - ref).abs().max()) / scale
                    rec["max_rel_diff_batch_vs_subset"] = float((batched[:n_ref] - batched_sub).abs().max()) / scale
                    rec["speedup_vs_reference"] = rec["reference_s"] / max(rec["batched_on_reference_layers_s"], 1e-12)
                    tot["reference_s"] += rec["reference_s"]
                    tot["batched_on_reference_layers_s"] += rec["batched_on_reference_layers_s"]
                rec["removed_exactly_zero"] = bool((batched[:, :, :C][drop] == 0).all())
                del W, drop, G_inv, A_inv, batched
            except Exception as e:  # record and go on: one failure does not lose the other measurements
                rec["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print(json.dumps(rec), flush=True)
            save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if args.concurrent:  # every shape's batch at once: interleaved chunk steps, one CUDA stream per batch
            try:
                problems = [make_problem(args.layers, R, C, frac, args.pattern, args.bias, dev, dtype, args.seed + i)
                            for i, (name, (R, C)) in enumerate(ARCH_SHAPES[args.arch].items())
                            if not args.shapes or name in args.shapes]
                seq, tot["one_after_another_s"] = timed(lambda: [obs_update_elements_batched(
                    *p, max_correlate=args.max_correlate) for p in problems], dev)
                con, tot["concurrent_s"] = timed(lambda: obs_update_elements_concurrent(
                    problems, max_correlate=args.max_correlate), dev)
                tot["concurrent_identical"] = all(torch.equal(a, b) for a, b in zip(seq, con))
                del problems, seq, con
            except Exception as e:
                tot["concurrent_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print(f"== drop {frac}: one after another {tot.get('one_after_another_s', float('nan')):.3f} s, "
                  f"concurrent {tot.get('concurrent_s', float('nan')):.3f} s", flush=True)
        tot["frac"] = frac
        results["update_totals"].append(tot)
        print(f"== drop {frac}: total {tot['total_s']:.3f} s; phases (instrumented) "
              + ", ".join(f"{k} {v:.3f}" for k, v in tot["phases"].items())
              + (f"; reference {tot['reference_s']:.3f} s vs batched {tot['batched_on_reference_layers_s']:.3f} s on "
                 f"{args.reference_layers} layers/type" if args.reference_layers else ""), flush=True)
        save()


def blocked_cholesky(S: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-looking blocked Cholesky of SPD matrices (B, n, n): a library factorization of each nb x nb diagonal
    block, a triangular solve for the panel below it and the trailing update as one batched matmul, where most of
    the FLOPs are. Returns (L, info) as ``torch.linalg.cholesky_ex`` does (info: non-zero where a block failed)."""
    L = S.clone()
    n = S.shape[-1]
    info = torch.zeros(S.shape[0], dtype=torch.int32, device=S.device)
    for k in range(0, n, nb):
        e = min(k + nb, n)
        Lkk, bad = torch.linalg.cholesky_ex(L[:, k:e, k:e])
        info |= bad
        L[:, k:e, k:e] = Lkk
        if e < n:
            L21 = torch.linalg.solve_triangular(Lkk, L[:, e:, k:e].mT, upper=False).mT  # A21 Lkk⁻ᵀ
            L[:, e:, k:e] = L21
            L[:, e:, e:] -= torch.bmm(L21, L21.mT)
    return L.tril_(), info


def bench_cholesky(args, dev, results, save) -> None:
    B, n = args.chol_batch, args.chol_n
    backends = [None]
    if dev.type == "cuda":
        backends = [None, "cusolver", "magma"]
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    X = torch.randn(B, n, n, device=dev, dtype=torch.float64, generator=gen)
    S64 = torch.bmm(X, X.mT) / n + torch.eye(n, device=dev, dtype=torch.float64)
    del X
    S32 = S64.float()
    rhs = torch.randn(B, n, 1, device=dev, dtype=torch.float64, generator=gen)

    def best(fn):
        fn()  # warm-up
        ts = [timed(fn, dev)[1] for _ in range(args.chol_repeats)]
        return min(ts)

    for be in backends:
        if be is not None:
            try:
                torch.backends.cuda.preferred_linalg_library(be)
            except Exception as e:
                results["cholesky"].append({"backend": be, "error": f"{type(e).__name__}: {e}"})
                continue
        L_lib = torch.linalg.cholesky(S64) if args.chol_blocks else None
        cases = {
            "batched_fp64": lambda: torch.linalg.cholesky_ex(S64),
            "batched_fp32": lambda: torch.linalg.cholesky_ex(S32),
            "loop_fp64": lambda: [torch.linalg.cholesky_ex(S64[b]) for b in range(B)],
            "loop_fp32": lambda: [torch.linalg.cholesky_ex(S32[b]) for b in range(B)],
            **{f"blocked{nb}_fp64": (lambda nb=nb: blocked_cholesky(S64, nb)) for nb in args.chol_blocks},
        }
        for case, fn in cases.items():
            rec = {"backend": be or "default", "case": case, "B": B, "n": n}
            try:
                rec["best_s"] = best(fn)
                rec["per_matrix_ms"] = 1e3 * rec["best_s"] / B
                rec["gflops"] = B * n**3 / 3 / rec["best_s"] / 1e9
                if case.startswith("batched"):
                    L, info = torch.linalg.cholesky_ex(S64 if case.endswith("64") else S32)
                    rec["all_info_zero"] = bool((info == 0).all())
                if case.startswith("blocked"):
                    L, info = fn()
                    rec["all_info_zero"] = bool((info == 0).all())
                    rec["max_rel_diff_vs_library"] = float((L - L_lib).abs().max() / L.abs().max())
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            results["cholesky"].append(rec)
            print(json.dumps(rec), flush=True)
            save()
        L = torch.linalg.cholesky_ex(S64)[0]
        for case, solve in (("triangular_solves_fp64", linalg.triangular_cholesky_solve),
                            ("cholesky_solve_fp64", torch.cholesky_solve)):
            rec = {"backend": be or "default", "case": case, "B": B, "n": n}
            try:
                rec["best_s"] = best(lambda: solve(rhs, L))
                rec["residual"] = float((torch.bmm(S64, solve(rhs, L)) - rhs).abs().max())
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            results["cholesky"].append(rec)
            print(json.dumps(rec), flush=True)
        save()
    if dev.type == "cuda":
        try:
            torch.backends.cuda.preferred_linalg_library("default")
        except Exception:
            pass
    # does the batched factorization use the GPU better with more systems per call, or several calls on streams?
    # (the element update factors one batch of <= 30 systems per chunk step and layer type)
    for mult in args.chol_scan:
        rec = {"case": "batch_scan_fp64", "B": B * mult, "n": n}
        try:
            big = S64.repeat(mult, 1, 1)
            rec["best_s"] = best(lambda: torch.linalg.cholesky_ex(big))
            rec["per_matrix_ms"] = 1e3 * rec["best_s"] / (B * mult)
            del big
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        results["cholesky"].append(rec)
        print(json.dumps(rec), flush=True)
        if dev.type == "cuda" and mult > 1:  # the same work as ``mult`` batches of B on as many streams
            rec = {"case": "streams_fp64", "streams": mult, "B": B, "n": n}
            streams = [torch.cuda.Stream(dev) for _ in range(mult)]

            def on_streams():
                torch.cuda.current_stream(dev).synchronize()
                for st in streams:
                    with torch.cuda.stream(st):
                        torch.linalg.cholesky_ex(S64)
                for st in streams:
                    torch.cuda.current_stream(dev).wait_stream(st)
            try:
                rec["best_s"] = best(on_streams)
                rec["per_matrix_ms"] = 1e3 * rec["best_s"] / (B * mult)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            results["cholesky"].append(rec)
            print(json.dumps(rec), flush=True)
        save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=sorted(ARCH_SHAPES), default="smollm2-135m", help="layer shapes")
    p.add_argument("--layers", type=int, default=30, help="layers per layer type (one batch each)")
    p.add_argument("--drop-frac", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--pattern", default="unstructured", help="unstructured (random, --drop-frac) or n:m, e.g. 2:4")
    p.add_argument("--max-correlate", type=int, default=2000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="W and factor dtype")
    p.add_argument("--solve-dtype", choices=sorted(DTYPES), default="fp64",
                   help="Cholesky dtype of the batched update (fp32: refined; also compared with fp64)")
    p.add_argument("--no-bias", dest="bias", action="store_false", help="no bias column (default: C' = C + 1)")
    p.add_argument("--shapes", nargs="*", default=None, help="subset of the layer types (q_proj ... down_proj)")
    p.add_argument("--reference-layers", type=int, default=0,
                   help="also time the reference update (surgeon_core.reference) on this many layers per type and compare")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--chol-batch", type=int, default=30)
    p.add_argument("--chol-n", type=int, default=2000)
    p.add_argument("--chol-repeats", type=int, default=3)
    p.add_argument("--chol-blocks", type=int, nargs="*", default=[128, 256, 512],
                   help="block sizes of the matmul-based blocked Cholesky cases (none: skip them)")
    p.add_argument("--chol-scan", type=int, nargs="*", default=[],
                   help="also factor k x --chol-batch systems in one call (and on CUDA: k batches on k streams)")
    p.add_argument("--solve", choices=["triangular", "cholesky_solve"], default="triangular",
                   help="element updates: two batched triangular solves (the library's default) or torch.cholesky_solve")
    p.add_argument("--concurrent", action="store_true", help="also time every shape's batch solved at once "
                   "(obs_update_elements_concurrent) against one after another")
    p.add_argument("--skip-update", action="store_true")
    p.add_argument("--skip-cholesky", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    linalg.TRIANGULAR_SOLVES = args.solve == "triangular"
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
               "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
               "update": [], "update_totals": [], "cholesky": []}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    print(f"device {results['device_name']}, torch {torch.__version__}, threads {results['threads']}", flush=True)
    if not args.skip_update:
        bench_update(args, dev, DTYPES[args.dtype], results, save)
    if not args.skip_cholesky:
        try:
            bench_cholesky(args, dev, results, save)
        except Exception as e:
            results["cholesky"].append({"error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
