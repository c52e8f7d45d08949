"""Cross-check of our Wanda and SparseGPT against from-scratch versions of the papers' procedures: do the masks agree?

The independent versions below use only transformers and plain torch (none of surgeon_core's calibration, hooks,
mask or update code), written from the papers' descriptions. Both: decoder layers one after another; each layer's
calibration inputs are the outputs of the layers already pruned; one pass through the (still dense) layer collects
the statistics of every linear's inputs (float64 sums); then the layer's outputs are recomputed with its pruned
weights for the next layer.

- Wanda: the score of W_ij is |W_ij| * ||X_j||; unstructured keeps the best half of each output row, N:M the best N
  of every M consecutive inputs.
- SparseGPT (Algorithm 1 of the paper): H = X Xᵀ plus 1% of its mean diagonal, the upper Cholesky factor U of H⁻¹,
  columns in blocks of 128: unstructured chooses the block's mask up front (the half of W²/U_jj² that is smallest over
  the block), N:M every M columns per row on the weights as updated so far; each column's pruned weights give the
  error e = w / U_jj, which updates the rest of the block at once and the later blocks in one lazy product.

Our implementation (surgeon_core, the same method) then prunes a copy of the same model on the same windows; the
script reports, per linear type and in total, the fraction of mask entries that differ, and optionally the
perplexity of both models on evaluation windows. ``--dtype float64`` runs model, statistics and math in float64 on
both sides (surgeon_core follows a float64 model), which removes fp32 summation-order noise from the comparison.

    python benchmarks/baseline_crosscheck.py --model models/smollm2-135m --method sparsegpt \
        --calibration ../shared/data/a1/calibration_windows.npy --structure 2:4 --dtype float64 \
        --eval ../shared/data/a1/eval_windows.npy --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class _Stop(Exception):
    pass


def _sub(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _wanda_drop(W: torch.Tensor, sq: torch.Tensor, structure: str) -> torch.Tensor:
    score = W.abs().double() * sq.sqrt()[None, :]
    if structure == "unstructured":
        k = score.shape[1] // 2
        drop = torch.zeros_like(score, dtype=torch.bool)
        return drop.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    n, m = (int(v) for v in structure.split(":"))
    groups = score.reshape(score.shape[0], -1, m)
    drop = torch.zeros_like(groups, dtype=torch.bool)
    drop.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return drop.reshape(score.shape)


def _sparsegpt_weights(W: torch.Tensor, XtX: torch.Tensor, structure: str, block: int = 128,
                       damp: float = 0.01) -> torch.Tensor:
    """The pruned and updated weight (Algorithm 1 of the SparseGPT paper), in W's dtype."""
    W = W.clone()
    H = XtX.to(W.dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    drop = torch.zeros_like(W, dtype=torch.bool)
    nm = None if structure == "unstructured" else tuple(int(v) for v in structure.split(":"))
    for i in range(0, cols, block):
        j2 = min(i + block, cols)
        E = torch.zeros(rows, j2 - i, dtype=W.dtype)
        d = U.diagonal()[i:j2]
        if nm is None:
            s = (W[:, i:j2] ** 2 / d[None, :] ** 2).flatten()
            blk = torch.zeros_like(s, dtype=torch.bool)
            blk[torch.topk(s, s.numel() // 2, largest=False).indices] = True
            drop[:, i:j2] = blk.view(rows, j2 - i)
        for j in range(i, j2):
            if nm is not None and (j - i) % nm[1] == 0:
                s = W[:, j: j + nm[1]] ** 2 / U.diagonal()[j: j + nm[1]][None, :] ** 2
                drop[:, j: j + nm[1]] = False
                drop[:, j: j + nm[1]].scatter_(1, torch.topk(s, nm[1] - nm[0], dim=1, largest=False).indices, True)
            E[:, j - i] = torch.where(drop[:, j], W[:, j], 0) / U[j, j]
            W[:, j:j2] -= E[:, j - i: j - i + 1] * U[j: j + 1, j:j2]
        W[:, j2:] -= E @ U[i:j2, j2:]
    W[drop] = 0
    return W


@torch.no_grad()
def independent_prune(model, windows: torch.Tensor, structure: str, method: str = "wanda") -> None:
    """Prune ``model`` (a Llama-like HF model) in place with the procedure described in the module docstring."""
    layers = model.model.layers
    inputs, kwargs = [], {}

    def catch(_module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for i in range(windows.shape[0]):
        try:
            model(input_ids=windows[i: i + 1], use_cache=False)
        except _Stop:
            pass
    handle.remove()

    for layer in layers:
        sums = {name: torch.zeros((_sub(layer, name).in_features,) * (1 if method == "wanda" else 2),
                                  dtype=torch.float64) for name in LINEARS}

        def hook(name):
            def f(_m, args, _out):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                if method == "wanda":
                    sums[name] += (x * x).sum(dim=0)
                else:
                    sums[name] += x.T @ x
            return f

        hooks = [_sub(layer, name).register_forward_hook(hook(name)) for name in LINEARS]
        for x in inputs:
            layer(x, **kwargs)
        for h in hooks:
            h.remove()
        for name in LINEARS:
            lin = _sub(layer, name)
            if method == "wanda":
                lin.weight[_wanda_drop(lin.weight, sums[name], structure)] = 0
            else:
                lin.weight.copy_(_sparsegpt_weights(lin.weight, sums[name], structure))
        inputs = [_out(layer(x, **kwargs)) for x in inputs]


def _out(res):
    return res[0] if isinstance(res, tuple) else res


@torch.no_grad()
def ppl(model, windows: torch.Tensor) -> float:
    nll = []
    for i in range(windows.shape[0]):
        x = windows[i: i + 1]
        nll.append(float(model(input_ids=x, labels=x).loss))
    return math.exp(sum(nll) / len(nll))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True, help=".npy token windows (n, L)")
    p.add_argument("--method", choices=("wanda", "sparsegpt"), default="wanda")
    p.add_argument("--structure", default="2:4", help="unstructured (50%%) or N:M")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model, statistics and math on both sides (float64: no fp32 summation-order noise)")
    p.add_argument("--nsamples", type=int, default=None, help="first N calibration windows (default: all)")
    p.add_argument("--eval", help=".npy evaluation windows (n, L): also report both models' perplexity")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="window length when --eval is one long sequence")
    p.add_argument("--eval-max-windows", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--skip-ours", action="store_true", help="only the independent version (and its perplexity)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from surgeon_core import PruneOptions, prune

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))[: args.nsamples]
    t0 = time.perf_counter()
    theirs = copy.deepcopy(dense)
    independent_prune(theirs, calib, args.structure, args.method)
    t1 = time.perf_counter()
    ours = None if args.skip_ours else copy.deepcopy(dense)
    del dense
    if ours is not None:
        prune(ours, calib, options=PruneOptions(method=args.method, structure=args.structure, batch_size=1),
              target_size=0.5)
    t2 = time.perf_counter()
    per_type, per_layer, weight_diff, diff, total = {}, [], [], 0, 0
    for a, b in zip(theirs.model.layers, ours.model.layers if ours is not None else []):
        layer_diff = layer_total = 0
        weight_diff.append(max(float((_sub(a, n).weight - _sub(b, n).weight).abs().max()) for n in LINEARS))
        for name in LINEARS:
            ma, mb = _sub(a, name).weight != 0, _sub(b, name).weight != 0
            d = int((ma != mb).sum())
            t = per_type.setdefault(name.rsplit(".", 1)[-1], [0, 0])
            t[0] += d
            t[1] += ma.numel()
            diff, total = diff + d, total + ma.numel()
            layer_diff, layer_total = layer_diff + d, layer_total + ma.numel()
        per_layer.append(layer_diff / layer_total)
    out = {"model": args.model, "method": args.method, "dtype": args.dtype, "structure": args.structure,
           "calibration": args.calibration, "calibration_shape": list(calib.shape), "mask_entries": total, "mask_entries_differing": diff,
           "mask_fraction_differing": diff / total if total else None,
           "per_type_fraction_differing": {k: v[0] / v[1] for k, v in per_type.items()},
           "per_layer_fraction_differing": per_layer, "per_layer_max_abs_weight_difference": weight_diff,
           "seconds": {"independent": t1 - t0, "ours": t2 - t1}, "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    if args.eval:
        ev = torch.from_numpy(np.load(args.eval).astype(np.int64))
        if ev.dim() == 1:  # one long sequence: non-overlapping windows, remainder dropped (the protocols' form)
            ev = ev[: ev.numel() // args.eval_seqlen * args.eval_seqlen].reshape(-1, args.eval_seqlen)
        ev = ev[: args.eval_max_windows]
        out["eval_shape"] = list(ev.shape)
        out["ppl_independent"] = ppl(theirs, ev)
        if ours is not None:
            out["ppl_ours"] = ppl(ours, ev)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
