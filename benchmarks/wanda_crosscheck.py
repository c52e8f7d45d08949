"""Cross-check of our Wanda against a from-scratch version of the Wanda paper's procedure: do the masks agree?

The independent version below uses only transformers and plain torch (none of surgeon_core's calibration, hooks or
mask code), written from the paper's description: decoder layers one after another; each layer's calibration
inputs are the outputs of the layers already pruned; one pass through the (still dense) layer collects, for every
linear, the squared L2 norm of each input feature over all calibration tokens (float64 sums); the score of
weight W_ij is |W_ij| * ||X_j||; unstructured keeps the best half of each output row, N:M the best N of every M
consecutive inputs; then the layer's outputs are recomputed with its pruned weights for the next layer.

Our Wanda (surgeon_core, method "wanda") then prunes a copy of the same model on the same windows; the script
reports, per linear type and in total, the fraction of mask entries that differ, and optionally the perplexity of
both models on evaluation windows.

    python benchmarks/wanda_crosscheck.py --model models/smollm2-135m \
        --calibration ../shared/data/a1/calibration_windows.npy --structure 2:4 \
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


@torch.no_grad()
def independent_wanda(model, windows: torch.Tensor, structure: str) -> None:
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
        sums = {name: torch.zeros(_sub(layer, name).in_features, dtype=torch.float64) for name in LINEARS}

        def hook(name):
            def f(_m, args, _out):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] += (x * x).sum(dim=0)
            return f

        hooks = [_sub(layer, name).register_forward_hook(hook(name)) for name in LINEARS]
        for x in inputs:
            layer(x, **kwargs)
        for h in hooks:
            h.remove()
        for name in LINEARS:
            lin = _sub(layer, name)
            score = lin.weight.abs().double() * sums[name].sqrt()[None, :]
            if structure == "unstructured":
                k = score.shape[1] // 2
                drop = torch.zeros_like(score, dtype=torch.bool)
                drop.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
            else:
                n, m = (int(v) for v in structure.split(":"))
                groups = score.reshape(score.shape[0], -1, m)
                drop = torch.zeros_like(groups, dtype=torch.bool)
                drop.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
                drop = drop.reshape(score.shape)
            lin.weight[drop] = 0
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
    p.add_argument("--structure", default="2:4", help="unstructured (50%%) or N:M")
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

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))[: args.nsamples]
    t0 = time.perf_counter()
    theirs = copy.deepcopy(dense)
    independent_wanda(theirs, calib, args.structure)
    t1 = time.perf_counter()
    ours = None if args.skip_ours else copy.deepcopy(dense)
    del dense
    if ours is not None:
        prune(ours, calib, options=PruneOptions(method="wanda", structure=args.structure, batch_size=1),
              target_size=0.5)
    t2 = time.perf_counter()
    per_type, per_layer, diff, total = {}, [], 0, 0
    for i, (a, b) in enumerate(zip(theirs.model.layers, ours.model.layers if ours is not None else [])):
        layer_diff = layer_total = 0
        for name in LINEARS:
            ma, mb = _sub(a, name).weight != 0, _sub(b, name).weight != 0
            d = int((ma != mb).sum())
            t = per_type.setdefault(name.rsplit(".", 1)[-1], [0, 0])
            t[0] += d
            t[1] += ma.numel()
            diff, total = diff + d, total + ma.numel()
            layer_diff, layer_total = layer_diff + d, layer_total + ma.numel()
        per_layer.append(layer_diff / layer_total)
    out = {"model": args.model, "structure": args.structure, "calibration": args.calibration,
           "calibration_shape": list(calib.shape), "mask_entries": total, "mask_entries_differing": diff,
           "mask_fraction_differing": diff / total if total else None,
           "per_type_fraction_differing": {k: v[0] / v[1] for k, v in per_type.items()},
           "per_layer_fraction_differing": per_layer,
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
