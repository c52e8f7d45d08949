"""Memory and time model of one LLM Surgeon shot per model size (the tables of docs/scaling.md).

Factor sizes are exact, from the architectures: per decoder layer one input factor A (d_in²) per input group
(q/k/v share one, gate/up share one; o and down have their own) and one output factor G (d_out²) per linear, all
fp32. Times are a model, not a measurement: the forward+backward time is scaled by FLOPs from the one measured on an
H200 for Llama-2-7B, and the factor/solve rates are the assumptions printed with the table.

    python benchmarks/scaling_model.py            # the tables
    python benchmarks/scaling_model.py --json F   # also as JSON
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9

# (hidden d, intermediate i, layers, attention heads, key/value heads, vocabulary); Llama layout, 7 linears per layer
ARCHS = {
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 49152),
    "Llama-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "Llama-2-13B": (5120, 13824, 40, 40, 40, 32000),
    "Llama-2-70B": (8192, 28672, 80, 64, 8, 32000),
}

# calibration of the time model (docs/scaling.md says where each number comes from)
TOKENS = 128 * 2048  # the paper's calibration set: 128 windows of 2048 tokens
MEASURED_FWD_BWD_7B_S = 29.0  # one H200, bf16, gradient checkpointing: 7.2 s per 32 x 2048 (environment.md), x4
MEASURED_FWD_BWD_SMOL_S = 1.9  # one H200, SmolLM2 architecture, 128 x 2048 (environment.md)
GRAM_TFLOPS = {"fp32": 50.0, "bf16": 600.0}  # sustained rate of the factor matmuls (xᵀx), TFLOP/s (assumption)
SOLVE_TFLOPS = 14.8  # Cholesky + inverse of an n x n factor costs ~n³ FLOP: 11008 in 0.09 s on an H200 (measured)
COST_TFLOPS = 50.0  # fp32 row/column costs W A Wᵀ, Wᵀ G W (assumption)
H200_GB = 141.0
NODE_GPUS = 8
ACTIVATION_GB = 20.0  # activations + workspace at batch 8 with gradient checkpointing (7B measured: 97 GB - 78 GB)


@dataclass
class Row:
    model: str
    layers: int
    params_b: float  # all parameters, billions
    prunable_b: float  # decoder linears, billions
    a_per_layer_m: float  # millions of fp32 entries
    g_per_layer_m: float
    factors_gb: float  # all A and G, fp32
    weights_bf16_gb: float
    largest_factor: int
    gram_pflop: float  # factor accumulation over TOKENS
    fwd_bwd_s: float  # one H200, modelled (measured for 7B and SmolLM2)
    gram_fp32_s: float
    gram_bf16_s: float
    solve_s: float  # damped inverses of every factor, one GPU
    cost_s: float
    shot_bf16_s: float  # forward+backward + bf16 grams + solves + costs, one GPU
    one_gpu_gb: float  # weights + factors + activations
    fits_one_h200: bool
    node_share_gb: float  # factors sharded over 8 GPUs + weights sharded + activations, per GPU


def _row(name: str) -> Row:
    d, i, n_layers, heads, kv_heads, vocab = ARCHS[name]
    kv = d // heads * kv_heads  # k/v output width (GQA)
    linears = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # (in, out): q k v o gate up down
    prunable = n_layers * sum(a * b for a, b in linears)
    a_sides = [d, d, d, i]  # input groups: q/k/v, o, gate/up, down
    g_sides = [out for _, out in linears]
    a_entries = sum(s * s for s in a_sides)
    g_entries = sum(s * s for s in g_sides)
    params = prunable + vocab * d * (1 if name.startswith("SmolLM2") else 2) + n_layers * 2 * d + d
    factors_gb = n_layers * (a_entries + g_entries) * 4 / GB
    gram_flop = 2 * n_layers * (a_entries + g_entries) * TOKENS  # 2 d² FLOP per token per factor
    if name == "Llama-2-7B":
        fwd_bwd = MEASURED_FWD_BWD_7B_S
    elif name == "SmolLM2-135M":
        fwd_bwd = MEASURED_FWD_BWD_SMOL_S
    else:  # scaled from 7B by the FLOPs of the linears and the vocabulary head (attention left out)
        d7, i7, l7, _, _, v7 = ARCHS["Llama-2-7B"]
        fwd_bwd = MEASURED_FWD_BWD_7B_S * (prunable + vocab * d) / (l7 * (4 * d7 * d7 + 3 * d7 * i7) + v7 * d7)
    solve_flop = n_layers * sum(float(s) ** 3 for s in a_sides + g_sides)
    cost_flop = n_layers * sum(2 * a * b * (a + b) for a, b in linears)
    solve_s = solve_flop / (SOLVE_TFLOPS * 1e12)
    cost_s = cost_flop / (COST_TFLOPS * 1e12)
    gram_bf16 = gram_flop / (GRAM_TFLOPS["bf16"] * 1e12)
    weights_gb = 2 * params / GB
    one_gpu = weights_gb + factors_gb + ACTIVATION_GB
    return Row(
        model=name, layers=n_layers, params_b=params / 1e9, prunable_b=prunable / 1e9,
        a_per_layer_m=a_entries / 1e6, g_per_layer_m=g_entries / 1e6, factors_gb=factors_gb,
        weights_bf16_gb=weights_gb, largest_factor=max(a_sides + g_sides), gram_pflop=gram_flop / 1e15,
        fwd_bwd_s=fwd_bwd, gram_fp32_s=gram_flop / (GRAM_TFLOPS["fp32"] * 1e12), gram_bf16_s=gram_bf16,
        solve_s=solve_s, cost_s=cost_s, shot_bf16_s=fwd_bwd + gram_bf16 + solve_s + cost_s, one_gpu_gb=one_gpu,
        fits_one_h200=one_gpu <= H200_GB,
        node_share_gb=(factors_gb + weights_gb) / NODE_GPUS + ACTIVATION_GB)


def _table(rows: list[Row], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" if c[0] == "model" else "---:" for c in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = getattr(r, key)
            cells.append(("yes" if v else "no") if isinstance(v, bool) else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the rows and assumptions to this JSON file")
    args = p.parse_args(argv)
    rows = [_row(n) for n in ARCHS]
    print(f"Memory per model (fp32 factors; bf16 weights; activations+workspace {ACTIVATION_GB:g} GB at batch 8 "
          f"with gradient checkpointing; one H200 = {H200_GB:g} GB)\n")
    print(_table(rows, [("model", "model", ""), ("params_b", "params (B)", ".3f"),
                        ("prunable_b", "prunable (B)", ".3f"), ("a_per_layer_m", "A / layer (M floats)", ".1f"),
                        ("g_per_layer_m", "G / layer (M floats)", ".1f"), ("factors_gb", "factors (GB fp32)", ".1f"),
                        ("largest_factor", "largest factor", "d"), ("weights_bf16_gb", "weights bf16 (GB)", ".1f"),
                        ("one_gpu_gb", "one GPU total (GB)", ".1f"), ("fits_one_h200", "fits one H200", ""),
                        ("node_share_gb", f"per GPU, sharded over {NODE_GPUS} (GB)", ".1f")]))
    print(f"\nTime per shot on one H200 ({TOKENS:,} calibration tokens; modelled except the measured "
          f"forward+backward of 7B and SmolLM2)\n")
    print(_table(rows, [("model", "model", ""), ("fwd_bwd_s", "fwd+bwd (s)", ".1f"),
                        ("gram_pflop", "factor matmuls (PFLOP)", ".2f"), ("gram_fp32_s", "factors fp32 (s)", ".1f"),
                        ("gram_bf16_s", "factors bf16 (s)", ".1f"), ("solve_s", "inverses (s)", ".1f"),
                        ("cost_s", "costs (s)", ".1f"), ("shot_bf16_s", "shot, bf16 factors (s)", ".0f")]))
    assumptions = {"tokens": TOKENS, "measured_fwd_bwd_7b_s": MEASURED_FWD_BWD_7B_S,
                   "measured_fwd_bwd_smollm2_s": MEASURED_FWD_BWD_SMOL_S, "gram_tflops": GRAM_TFLOPS,
                   "solve_tflops": SOLVE_TFLOPS, "cost_tflops": COST_TFLOPS, "h200_gb": H200_GB,
                   "activation_gb": ACTIVATION_GB}
    print("\nassumptions: " + json.dumps(assumptions))
    if args.json:
        Path(args.json).write_text(json.dumps({"assumptions": assumptions, "rows": [asdict(r) for r in rows]},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
