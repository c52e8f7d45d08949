"""Inference speed of a dense and a materialized (really smaller) model, measured the same way for both.

Two workloads, each timed after a warm-up and repeated with the models interleaved (dense, pruned, dense, ...), so
a background load on the machine hits both alike; the median of the repeats is reported:

- **prefill** (scoring): one forward over ``prefill_batch × prefill_len`` random tokens with logits for every
  position (the workload of perplexity evaluation and of the FLOP count below); tokens/s and seconds per batch;
- **decode**: a ``prompt_len`` prompt, then ``decode_tokens`` greedy steps with the KV cache for
  ``decode_batch`` sequences; ms per step (the per-token latency) and generated tokens/s.

The *ideal* speed-up is the ratio of FLOPs per token, dense ÷ pruned, counting every linear layer including the
vocabulary head (2 FLOPs per weight per token; attention-score FLOPs and the embedding lookup are left out): the
speed-up a model that is only smaller could show. Only torch and the model's own forward are used.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch
from torch import nn

__all__ = ["linear_flops_per_token", "measure", "compare"]


def linear_flops_per_token(model: nn.Module) -> int:
    """2 × the weights of every nn.Linear (head included, tied or not): FLOPs per token of the matmuls."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(vocab: int, batch: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


@torch.inference_mode()
def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - t0


def _cache_kw(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this version's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    kw = _cache_kw(model)
    out = model(input_ids=prompt, use_cache=True)
    past = getattr(out, kw)
    nxt = out.logits[:, -1:].argmax(dim=-1)
    _sync(prompt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        past = getattr(out, kw)
        nxt = out.logits[:, -1:].argmax(dim=-1)
    _sync(prompt.device)
    return time.perf_counter() - t0


def measure(model: nn.Module, *, prefill_batch: int = 1, prefill_len: int = 512, decode_batch: int = 1,
            prompt_len: int = 32, decode_tokens: int = 32, seed: int = 0) -> dict:
    """One timing of each workload (no warm-up; :func:`compare` warms up and repeats)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    t_pre = _prefill(model, _tokens(vocab, prefill_batch, prefill_len, device, seed))
    t_dec = _decode(model, _tokens(vocab, decode_batch, prompt_len, device, seed + 1), decode_tokens)
    return {"prefill_seconds": t_pre, "decode_seconds": t_dec}


def compare(dense: nn.Module, pruned: nn.Module, *, repeats: int = 3, warmup: int = 1, prefill_batch: int = 1,
            prefill_len: int = 512, decode_batch: int = 1, prompt_len: int = 32, decode_tokens: int = 32,
            seed: int = 0, progress=None) -> dict:
    """Time both models (interleaved), return tokens/s, latencies, measured and ideal speed-ups."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    kw = dict(prefill_batch=prefill_batch, prefill_len=prefill_len, decode_batch=decode_batch,
              prompt_len=prompt_len, decode_tokens=decode_tokens, seed=seed)
    models = {"dense": dense, "pruned": pruned}
    for _ in range(warmup):
        for m in models.values():
            measure(m, **kw)
    runs: dict[str, list[dict]] = {k: [] for k in models}
    for r in range(repeats):
        for name, m in models.items():
            runs[name].append(measure(m, **kw))
        if progress is not None:
            progress(r + 1, repeats)
    out: dict = {"settings": {**kw, "repeats": repeats, "warmup": warmup,
                              "device": str(next(dense.parameters()).device),
                              "dtype": str(next(dense.parameters()).dtype).replace("torch.", ""),
                              "threads": torch.get_num_threads()}}
    for name, m in models.items():
        pre = statistics.median(x["prefill_seconds"] for x in runs[name])
        dec = statistics.median(x["decode_seconds"] for x in runs[name])
        out[name] = {
            "parameters": sum(p.numel() for p in m.parameters()),
            "linear_flops_per_token": linear_flops_per_token(m),
            "prefill_seconds": pre,
            "prefill_tokens_per_s": prefill_batch * prefill_len / pre,
            "prefill_ms_per_token": 1000 * pre / (prefill_batch * prefill_len),
            "decode_ms_per_token": 1000 * dec / decode_tokens,
            "decode_tokens_per_s": decode_batch * decode_tokens / dec,
            "runs": runs[name],
        }
    d, p = out["dense"], out["pruned"]
    ideal = d["linear_flops_per_token"] / p["linear_flops_per_token"]
    out["ideal_speedup"] = ideal
    for work in ("prefill", "decode"):
        s = p[f"{work}_tokens_per_s"] / d[f"{work}_tokens_per_s"]
        out[f"{work}_speedup"] = s
        out[f"{work}_fraction_of_ideal"] = s / ideal
    return out


def structure_report(pruned_dir: str, dense_dir: str, *, threads: int | None = None, prefill_len: int = 256,
                     decode_tokens: int = 16, repeats: int = 3, align: int = 64) -> dict:
    """The honest report of a structured output: parameters, file sizes and speed of the materialized model.

    The zeroed model in ``pruned_dir`` is materialized in memory (all-zero FFN units and heads dropped, widths
    padded to ``align``) and written to a temporary folder for its file size; both it and the dense model in
    ``dense_dir`` are then timed on this machine's CPU in fp32 (:func:`compare`, batch 1).
    """
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from surgeon_core.adapters import adapter_for
    from surgeon_core.materialize import count_parameters

    from .materialize import materialize_model, safetensors_bytes, save_materialized

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32, local_files_only=True).eval()
        pruned = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32, local_files_only=True).eval()
        adapter = adapter_for(dense)
        before = count_parameters(dense, adapter)
        pruned, mat = materialize_model(pruned, align=align)
        after = count_parameters(pruned.eval(), adapter)
        with tempfile.TemporaryDirectory() as tmp:
            save_materialized(pruned, Path(tmp) / "m")
            files = {"dense": safetensors_bytes(dense_dir), "zeroed": safetensors_bytes(pruned_dir),
                     "materialized": safetensors_bytes(Path(tmp) / "m")}
        seqlen = min(prefill_len, getattr(dense.config, "max_position_embeddings", prefill_len))
        res = compare(dense, pruned, repeats=repeats, prefill_len=seqlen, decode_tokens=decode_tokens,
                      prompt_len=min(32, seqlen))
        for k in ("dense", "pruned"):
            res[k].pop("runs", None)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "parameters": {"dense_total": before["total"], "materialized_total": after["total"],
                       "dense_prunable": before["prunable"], "materialized_prunable": after["prunable"],
                       "prunable_fraction": after["prunable"] / before["prunable"]},
        "file_bytes": files, "align": align, "layers": mat["layers"], "speed": res,
    }
