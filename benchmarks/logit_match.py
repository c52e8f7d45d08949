"""Do the materialized model's logits equal the zeroed model's? Measured against fp32's own rounding noise.

Prunes SmolLM2 (or any Llama/OPT folder) with coupled structures (one shot, a few A1 calibration windows), then
compares on evaluation windows:

- materialized fp32 vs zeroed fp32 (the issue's check: max |Δlogit|);
- the same in float64 (0 means the two compute the same function exactly);
- each fp32 model vs the float64 zeroed model (its distance to the exact answer);
- the fp32 noise floor of the dense model itself: the same windows in one batch vs one at a time;
- with ``--replay-blocks B``: the materialized fp32 model again, its two reduced-width linears per layer (o_proj,
  down_proj) summing their kept input columns grouped by the zeroed model's B-column blocks, each block from zero,
  added in order. This CPU's MKL fp32 GEMM reduces in 192-column blocks that way (for 64 tokens or more;
  ``zero_columns_matmul.py``), so with B = 192 the materialized weights are asked to reproduce the zeroed model's
  fp32 arithmetic exactly: a diagnostic of where the fp32 difference comes from, not a mode the product ships.

    python benchmarks/logit_match.py --model models/smollm2-135m --calibration ../shared/data/a1/calibration_windows.npy \
        --eval ../shared/data/a1/eval_windows.npy --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.materialize import materialize_model  # noqa: E402
from surgeon_core.adapters import adapter_for, get_submodule  # noqa: E402
from surgeon_core.materialize import find_kept  # noqa: E402
from surgeon_core.shot import PruneOptions, prune  # noqa: E402


class BlockReplayLinear(nn.Module):
    """A materialized linear whose input columns are the kept ones of a wider zeroed linear (``cols``, ascending):
    sums x @ Wᵀ over the columns of each ``block``-wide slice of the original width separately (from zero), adding
    the slices' results in order."""

    def __init__(self, lin: nn.Linear, cols: torch.Tensor, block: int):
        super().__init__()
        if lin.bias is not None:
            raise ValueError("block replay is written for linears without a bias")
        self.weight = lin.weight
        starts = torch.searchsorted(cols, torch.arange(0, int(cols.max()) + block + 1, block))
        self.ranges = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]) if b > a]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for a, b in self.ranges:
            part = F.linear(x[..., a:b].contiguous(), self.weight[:, a:b].contiguous())
            out = part if out is None else out + part
        return out


def replay_blocks_(mat: nn.Module, adapter, kept: list[dict], head_dim: int, block: int) -> int:
    """Swap the reduced-width o_proj/down_proj of a materialized Llama-like model for BlockReplayLinear."""
    n = 0
    for layer, kp in zip(get_submodule(mat, adapter.layers), kept):
        heads = kp["heads"]
        cols = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        for path, c in ((adapter.attention_out, cols), (adapter.mlp_out, kp["ffn"])):
            lin = get_submodule(layer, path)
            if c.numel() == 0 or not isinstance(lin, nn.Linear):
                continue
            parent, _, name = path.rpartition(".")
            setattr(get_submodule(layer, parent) if parent else layer, name, BlockReplayLinear(lin, c, block))
            n += 1
    return n


@torch.no_grad()
def logits(model, x: torch.Tensor, one_by_one: bool = False) -> torch.Tensor:
    if one_by_one:
        return torch.cat([model(input_ids=x[i: i + 1]).logits for i in range(x.shape[0])])
    return model(input_ids=x).logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--target-size", type=float, default=0.8)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 matmuls without TF32 there)")
    p.add_argument("--replay-blocks", type=int, metavar="B",
                   help="also time the materialized model with its reduced linears summing in the zeroed model's "
                        "B-column blocks (192 = this CPU's MKL)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    calib = torch.from_numpy(np.load(args.calibration).astype(np.int64))[: args.nsamples].to(device)
    x = torch.from_numpy(np.load(args.eval).astype(np.int64))[: args.windows, : args.seqlen].to(device)
    zeroed = copy.deepcopy(dense)
    prune(zeroed, calib, options=PruneOptions(structure="coupled", batch_size=2), target_size=args.target_size)
    adapter = adapter_for(zeroed)
    layout = adapter.head_layout(zeroed.config)
    kept = find_kept(zeroed, adapter, layout)
    mat, report = materialize_model(copy.deepcopy(zeroed), kept=kept, align=1)
    mat64, _ = materialize_model(copy.deepcopy(zeroed).double(), align=1)
    z32, m32 = logits(zeroed, x), logits(mat.eval(), x)
    replay = None
    if args.replay_blocks:
        rep = copy.deepcopy(mat)
        swapped = replay_blocks_(rep, adapter, kept, layout[2], args.replay_blocks)
        r32 = logits(rep.eval(), x)
        replay = {"block": args.replay_blocks, "linears_replayed": swapped,
                  "materialized_replay_vs_zeroed_fp32": float((r32 - z32).abs().max()),
                  "identical": bool(torch.equal(r32, z32))}
    z64, m64 = logits(zeroed.double(), x), logits(mat64.eval(), x)
    d32, d32_one = logits(dense, x), logits(dense, x, one_by_one=True)
    out = {
        "model": args.model, "target_size": args.target_size, "eval_tokens": list(x.shape),
        "parameters": {"before": report["parameters_before"]["total"], "after": report["parameters_after"]["total"]},
        "max_logit": float(z64.abs().max()),
        "materialized_vs_zeroed_fp32": float((m32 - z32).abs().max()),
        "materialized_vs_zeroed_fp64": float((m64 - z64).abs().max()),
        "zeroed_fp32_vs_exact": float((z32.double() - z64).abs().max()),
        "materialized_fp32_vs_exact": float((m32.double() - z64).abs().max()),
        "dense_fp32_batch_vs_one_by_one": float((d32 - d32_one).abs().max()),
        "argmax_agreement_fp32": float((m32.argmax(-1) == z32.argmax(-1)).float().mean()),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "replay": replay,
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
