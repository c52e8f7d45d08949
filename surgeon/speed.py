"""Inference speed of a dense and a materialized (really smaller) model, measured the same way for both.

Two workloads, each timed after a warm-up and repeated in interleaved rounds (dense then pruned, then pruned then
dense, ...), so a background load on the machine hits both alike; the median of the repeats is reported, with its
spread:

- **prefill** (scoring): one forward over ``prefill_batch × prefill_len`` random tokens with logits for every
  position (the workload of perplexity evaluation and of the FLOP count below); tokens/s and seconds per batch;
- **decode**: a ``prompt_len`` prompt, then ``decode_tokens`` greedy steps with the KV cache for
  ``decode_batch`` sequences; ms per step (the per-token latency) and generated tokens/s.

The *ideal* speed-up is the ratio of FLOPs per token, dense ÷ pruned, counting every linear layer including the
vocabulary head (2 FLOPs per weight per token; attention-score FLOPs and the embedding lookup are left out): the
speed-up a model that is only smaller could show. Only torch and the model's own forward are used.

**Honest verdicts.** Each round gives a paired speed-up (dense seconds ÷ pruned seconds of that round); the
reported speed-up is their median and its spread their interquartile range. A change is claimed ("faster",
"slower") only when the whole interquartile range lies on one side of 1 and at least ``MIN_ROUNDS_FOR_VERDICT``
rounds ran; otherwise, and always when nothing was removed (same parameter count), the verdict is "no measurable
change". Every report names what it measured on (``measured_on``: device, its name, torch threads, usable cores).

``compile=True`` (off by default; the eager path above is then unchanged) removes the launch and Python overhead of
both models in the same way, so the measured speed-up is that of the smaller matrices rather than of the kernel
launches: prefill runs through ``torch.compile(model)`` (``compile_mode``, default "default"), and decode keeps its
keys and values in a transformers ``StaticCache`` (preallocated for ``prompt_len + decode_tokens`` positions, one
tensor pair per layer sized on first use, so the per-layer kv-head counts of a materialized model fit) while each
one-token step runs through ``torch.compile(model, mode="reduce-overhead")``, i.e. as a replayed CUDA graph on a
GPU (on a CPU: "default", no graphs). The prompt pass into the static cache stays eager and untimed, as in the
eager path. Compilation happens in the warm-up (at least one round), never in the timed repeats; the warm-up's
seconds are reported as ``first_call_seconds`` and ``compile_seconds`` (warm-up minus median). ``decode_graph=True``
(GPU) goes one step further for decode: the compiled step, the greedy pick and the position advance are captured
as one CUDA graph and replayed per token with no Python in between (see :class:`CompiledRunner`).
"""

from __future__ import annotations

import functools
import inspect
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
import torch.nn.attention.flex_attention as flex_attention_module
import transformers.integrations.sdpa_attention as sdpa_attention_module
from transformers import AttentionInterface, AutoModelForCausalLM, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from surgeon_core.adapters import adapter_for
from surgeon_core.materialize import count_parameters

from .materialized_export import (kept_from_json, materialize_checked, materialize_model, safetensors_bytes,
                                  save_materialized)

__all__ = ["linear_flops_per_token", "measure", "compare", "CompiledRunner", "greedy_decode", "set_decode_attention",
           "spread", "verdict", "measured_on", "speed_summary", "NO_CHANGE", "MIN_ROUNDS_FOR_VERDICT"]

NO_CHANGE = "no measurable change"
MIN_ROUNDS_FOR_VERDICT = 3  # fewer rounds give no spread worth the name: no change is claimed from them


def spread(values) -> dict:
    """Median, quartiles (inclusive method) and extremes of a sample of at least one value."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("spread of an empty sample")
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs)}


def verdict(ratios: dict) -> str:
    """The claim a spread of paired speed-ups (:func:`spread` of dense ÷ pruned seconds per round) supports."""
    if ratios["n"] < MIN_ROUNDS_FOR_VERDICT:
        return NO_CHANGE
    if ratios["q1"] > 1.0:
        return "faster"
    if ratios["q3"] < 1.0:
        return "slower"
    return NO_CHANGE


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def measured_on(device: str | torch.device) -> dict:
    """What a timing ran on: device type, its name (GPU or CPU model), torch's thread count and usable cores."""
    d = torch.device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else _cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": d.type, "name": name, "threads": torch.get_num_threads(), "usable_cores": cores}


def speed_summary(speed: dict) -> str:
    """One line: per workload the median speed-up, its interquartile range and the verdict; the ideal speed-up;
    what was measured on."""
    m = speed["measured_on"]
    where = f"{m['name']}, {m['threads']} thread(s)" if m["device"] == "cpu" else m["name"]
    parts = []
    for work in ("prefill", "decode"):
        r = speed[f"{work}_speedup_spread"]
        parts.append(f"{work} x{r['median']:.3f} (middle half x{r['q1']:.3f}-x{r['q3']:.3f}): "
                     f"{speed[f'{work}_verdict']}")
    note = " (nothing removed)" if speed.get("nothing_removed") else ""
    return (f"{'; '.join(parts)}; ideal x{speed['ideal_speedup']:.3f}{note}; {speed['settings']['repeats']} "
            f"interleaved rounds on {m['device']} ({where})")


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
def _decode(model: nn.Module, prompt: torch.Tensor, steps: int, keep: bool = False):
    """Eager greedy decode with the model's own KV cache: (seconds of the ``steps`` one-token steps after the
    untimed prompt pass, tokens (batch, steps + 1), last-position logits (steps + 1, batch, vocab) fp32) - the last
    two only with ``keep``."""
    kw = _cache_kw(model)
    out = model(input_ids=prompt, use_cache=True)
    past = getattr(out, kw)
    nxt = out.logits[:, -1:].argmax(dim=-1)
    toks, logits = ([nxt], [out.logits[:, -1].float()]) if keep else (None, None)
    _sync(prompt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        past = getattr(out, kw)
        nxt = out.logits[:, -1:].argmax(dim=-1)
        if keep:
            toks.append(nxt)
            logits.append(out.logits[:, -1].float())
    _sync(prompt.device)
    dt = time.perf_counter() - t0
    if not keep:
        return dt, None, None
    return dt, torch.cat(toks, dim=1), torch.stack(logits)


def _raise_recompile_limit(n: int = 64) -> None:
    """Both models share one forward (the materialized class subclasses the dense one) and prefill and decode step
    are two more graphs of it: keep dynamo from falling back to eager after its default 8 recompiles."""
    import torch._dynamo  # lazy: torch.compile's machinery (~1.5 s to import), only for compiled timing

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name, n) < n:
        setattr(cfg, name, n)


def _compile_counters() -> dict:
    """Graph breaks, graphs compiled and CUDA-graph skips so far (dynamo's global counters): a diagnosis aid."""
    try:
        from torch._dynamo.utils import counters  # lazy: torch.compile's machinery, only for compiled timing
    except ImportError:  # pragma: no cover - torch without dynamo
        return {}
    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

DECODE_ATTENTION = ("sdpa", "flex")
FLEX_DECODE = "surgeon_flex_decode"  # the attention implementation name registered with transformers


def _check_decode_attention(kind: str) -> None:
    if kind not in DECODE_ATTENTION:
        raise ValueError(f"decode attention must be one of {DECODE_ATTENTION}, got {kind!r}")


def _flex_decode_mask(*args, block: int = 32, **kwargs):
    """transformers' SDPA mask, except for one-token queries (decode steps), where the same boolean mask becomes a
    FlexAttention ``BlockMask`` of ``block``-position blocks: built once per forward, and blocks of the static
    cache not written yet are skipped by the kernel instead of read and masked."""
    mask = sdpa_mask(*args, **kwargs)
    if not (torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[-2] == 1 and mask.dtype == torch.bool):
        return mask  # prompt passes (or no mask needed): SDPA, unchanged
    batch = kwargs.get("batch_size", args[0] if args else mask.shape[0])
    # the visible positions of a decode step over a static cache are a prefix of it (no padding in this harness):
    # pass their count, a reduction, which inductor keeps as a buffer - a boolean mask read by the mask_mod is
    # inlined as its computation into the attention kernel, which inductor (torch 2.11) then fails to compile
    visible = mask.expand(batch, -1, -1, -1)[:, 0, 0, :]
    if not torch.compiler.is_compiling() and not torch.equal(visible, visible.cummin(dim=-1).values):
        raise ValueError("flex decode attention needs each sequence's visible cache positions to be a prefix "
                         "(no padding)")
    lengths = visible.sum(dim=-1)

    def mask_mod(b, h, q, kv):
        return kv < lengths[b]

    return flex_attention_module.create_block_mask(mask_mod, batch, None, 1, mask.shape[-1], device=mask.device,
                                                   BLOCK_SIZE=block)


def _flex_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Decode steps (a ``BlockMask`` from :func:`_flex_decode_mask`) through ``torch``'s FlexAttention, whose
    decoding kernel inductor generates when the step is compiled; everything else through transformers' SDPA."""
    # both kernels are looked up in their modules when called (a test or profiler may wrap them there)
    if not isinstance(attention_mask, flex_attention_module.BlockMask):
        return sdpa_attention_module.sdpa_attention_forward(module, query, key, value, attention_mask,
                                                            scaling=scaling, **kwargs)
    out = flex_attention_module.flex_attention(query, key, value, block_mask=attention_mask, scale=scaling,
                                               enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def set_decode_attention(model: nn.Module, kind: str = "sdpa", block: int = 32) -> None:
    """Choose the attention of ``model``'s decode steps: "sdpa" (transformers' default SDPA, mask over the whole
    static cache) or "flex" (FlexAttention for one-token queries, skipping unwritten cache blocks of ``block``
    positions; prompt passes stay SDPA). "flex" needs the step compiled (:class:`CompiledRunner`; inductor generates
    the kernel, Triton on a GPU, C++ on a CPU): eager FlexAttention is a slow reference path."""
    _check_decode_attention(kind)
    if kind == "sdpa":
        model.set_attn_implementation("sdpa")
        return
    AttentionInterface.register(FLEX_DECODE, _flex_decode_attention)
    AttentionMaskInterface.register(FLEX_DECODE, functools.partial(_flex_decode_mask, block=block))
    model.set_attn_implementation(FLEX_DECODE)


def _inductor_options(model: nn.Module) -> dict:
    """inductor options for compiling ``model``, scoped to that compile (the global config is left alone).

    With FlexAttention decode steps, template prologue fusion is off: the configuration the flex decode kernel is
    compiled and checked in (what it may read of the mask: see _flex_decode_mask). It only concerns template
    kernels."""
    if getattr(model.config, "_attn_implementation", None) == FLEX_DECODE:
        return {"prologue_fusion": False}
    return {}


class CompiledRunner:
    """Prefill and greedy decode of one model without launch overhead; the same recipe for every model.

    - prefill: ``torch.compile(model, mode=compile_mode, dynamic=False)``, one forward without cache;
    - decode: a transformers ``StaticCache`` of ``prompt + steps`` positions (each layer's key/value tensors are
      allocated at the first update from that layer's own shapes, so layers with different kv-head counts fit; the
      cache is kept and reset between calls, so its addresses, which CUDA graphs capture, stay fixed), filled by an
      eager prompt pass; every one-token step then runs through ``torch.compile(model, mode=decode_mode,
      dynamic=False)``; ``decode_mode`` defaults to "reduce-overhead" (CUDA graphs) on a GPU, "default" on a CPU.

    ``fullgraph=True`` is tried first; if a compile fails, the stage is recompiled with graph breaks allowed and
    the reason is kept in ``notes``. ``compile_prefill`` / ``compile_decode`` False run that stage eagerly (the
    static cache stays). ``backend`` other than "inductor" (e.g. "eager" in tests) takes no mode.

    ``decode_graph=True`` (CUDA only) captures the *whole* one-token step — the compiled forward (``decode_mode``
    then defaults to inductor's "default", without its own CUDA graphs), the greedy pick and the advance of the
    position — as one CUDA graph that is replayed once per token: no Python, no dynamo guard and no CUDA-graph
    bookkeeping per step, as in serving engines. The graph is kept while the cache shape is; the compiled forward
    is warmed up (compiled) on a side stream first.
    """

    def __init__(self, model: nn.Module, *, compile_mode: str = "default", decode_mode: str | None = None,
                 backend: str = "inductor", fullgraph: bool = True, compile_prefill: bool = True,
                 compile_decode: bool = True, decode_graph: bool = False):
        self.model = model
        self.device = next(model.parameters()).device
        if decode_graph and self.device.type != "cuda":
            raise ValueError(f"decode_graph captures a CUDA graph: the model is on {self.device}, not a GPU")
        if decode_graph and decode_mode in _CUDAGRAPH_MODES:
            raise ValueError(f"decode_graph is the CUDA graph itself: decode_mode {decode_mode!r} would nest "
                             "inductor's CUDA graphs inside it; use 'default' or 'max-autotune-no-cudagraphs'")
        self.decode_graph = decode_graph
        self.cache_kw = _cache_kw(model)
        self.backend = backend
        default_decode = "reduce-overhead" if self.device.type == "cuda" and not decode_graph else "default"
        self.modes = {"prefill": compile_mode, "decode": decode_mode or default_decode}
        self.enabled = {"prefill": compile_prefill, "decode": compile_decode}
        self.fullgraph = {"prefill": fullgraph, "decode": fullgraph}
        self.notes: list[str] = []
        self._fns: dict = {}
        self._cache = None
        self._cache_shape: tuple | None = None
        self._graph: dict | None = None  # decode_graph: the captured step and its static buffers
        if compile_prefill or compile_decode:
            _raise_recompile_limit()

    def cuda_graphs(self, stage: str) -> bool:
        """Whether ``stage`` ("prefill" / "decode") runs as CUDA graphs (inductor, a cudagraph mode, a GPU)."""
        return (self.enabled[stage] and self.backend == "inductor" and self.device.type == "cuda"
                and self.modes[stage] in _CUDAGRAPH_MODES)

    def settings(self) -> dict:
        return {"compile_mode": self.modes["prefill"] if self.enabled["prefill"] else None,
                "decode_compile_mode": self.modes["decode"] if self.enabled["decode"] else None,
                "compile_backend": self.backend, "static_cache": True,
                "cuda_graphs": {s: self.cuda_graphs(s) for s in ("prefill", "decode")},
                "decode_graph": self.decode_graph, "fullgraph": dict(self.fullgraph)}

    def _compiled(self, stage: str):
        if stage not in self._fns:
            kw: dict = {"dynamic": False, "fullgraph": self.fullgraph[stage], "backend": self.backend}
            if self.backend == "inductor":
                extra = _inductor_options(self.model)
                if extra:  # torch.compile takes a mode or options, not both: the mode's options plus ours
                    from torch._inductor import list_mode_options  # lazy: torch.compile's machinery
                    kw["options"] = {**list_mode_options(self.modes[stage], False), **extra}
                else:
                    kw["mode"] = self.modes[stage]
            self._fns[stage] = torch.compile(self.model, **kw)
        return self._fns[stage]

    def _call(self, stage: str, **inputs):
        if not self.enabled[stage]:
            return self.model(**inputs)
        if self.cuda_graphs(stage):  # the previous step's outputs (graph memory) are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        first = stage not in self._fns
        fn = self._compiled(stage)
        if not (first and self.fullgraph[stage]):
            return fn(**inputs)
        try:
            return fn(**inputs)
        except Exception as e:  # noqa: BLE001 - any compile failure: retry once with graph breaks allowed
            note = f"{stage}: fullgraph compile failed ({type(e).__name__}: {str(e)[:300]}); graph breaks allowed"
            warnings.warn(note, stacklevel=2)
            self.notes.append(note)
            self.fullgraph[stage] = False
            del self._fns[stage]
            return self._compiled(stage)(**inputs)

    def static_cache(self, batch: int, length: int):
        """The static cache for ``batch`` sequences of up to ``length`` tokens: kept (reset) while the shape is."""
        if self._cache_shape == (batch, length):
            self._cache.reset()  # in place: zeroed tensors and position counters, same addresses
            return self._cache
        self._graph = None  # a captured step reads the old cache's addresses
        self._cache = None  # release the old one before allocating
        self._cache = StaticCache(config=self.model.config, max_cache_len=length)
        self._cache_shape = (batch, length)
        return self._cache

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> float:
        _sync(ids.device)
        t0 = time.perf_counter()
        out = self._call("prefill", input_ids=ids, use_cache=False)
        _sync(ids.device)
        dt = time.perf_counter() - t0
        del out
        return dt

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int, keep: bool = False):
        """Greedy decode of ``steps`` tokens after an (untimed, eager) prompt pass; returns (seconds of the steps,
        tokens (batch, steps + 1), last-position logits (steps + 1, batch, vocab) in fp32) - the last two only
        with ``keep``."""
        cache = self.static_cache(prompt.shape[0], prompt.shape[1] + steps)
        if self.decode_graph and self._graph is None:
            self._graph = self._capture(prompt)
        kw = {self.cache_kw: cache}
        out = self.model(input_ids=prompt, use_cache=True, **kw)
        nxt = out.logits[:, -1:].argmax(dim=-1)
        toks = [nxt] if keep else None
        logits = [out.logits[:, -1].to(torch.float32, copy=True)] if keep else None
        del out
        g = self._graph
        if g is not None:
            g["ids"].copy_(nxt)

        def step(nxt):  # -> (next tokens, last-position logits)
            if g is not None:  # one replay = forward, greedy pick and position advance
                g["graph"].replay()
                return g["ids"], g["logits"]
            out = self._call("decode", input_ids=nxt, use_cache=True, **kw)
            return out.logits[:, -1:].argmax(dim=-1), out.logits[:, -1]

        _sync(prompt.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt, last = step(nxt)
            if keep:  # copies: a graph's buffers are overwritten by the next replay
                toks.append(nxt.clone())
                logits.append(last.to(torch.float32, copy=True))
            del last  # no reference into a step's (CUDA-graph) outputs survives into the next step
        _sync(prompt.device)
        dt = time.perf_counter() - t0
        if not keep:
            return dt, None, None
        return dt, torch.cat(toks, dim=1), torch.stack(logits)

    def _capture(self, prompt: torch.Tensor) -> dict:
        """Warm up (compile) the decode step on a side stream after a prompt pass, then capture step = compiled
        forward + greedy pick into one CUDA graph over a static token buffer. The cache advances its own position
        (a device tensor in transformers' static cache), so a replay is a whole step. The cache is reset afterwards:
        the caller's prompt pass starts from a clean state."""
        cache = self._cache
        kw = {self.cache_kw: cache}
        self.model(input_ids=prompt, use_cache=True, **kw)
        ids = torch.zeros(prompt.shape[0], 1, dtype=torch.long, device=self.device)

        def step():  # through _call: a failed fullgraph compile falls back to graph breaks in the warm-up
            out = self._call("decode", input_ids=ids, use_cache=True, **kw)
            logits = out.logits[:, -1]
            ids.copy_(logits.argmax(dim=-1, keepdim=True))
            return logits

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        cache.reset()
        return {"graph": graph, "ids": ids, "logits": logits}


def greedy_decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager decode of :func:`measure` (dynamic cache), keeping (tokens (batch, steps + 1), last-position
    logits (steps + 1, batch, vocab) fp32): the reference for :meth:`CompiledRunner.decode`."""
    return _decode(model, prompt, steps, keep=True)[1:]


def measure(model: nn.Module, *, prefill_batch: int = 1, prefill_len: int = 512, decode_batch: int = 1,
            prompt_len: int = 32, decode_tokens: int = 32, seed: int = 0, compile: bool = False,
            runner: CompiledRunner | None = None, **compile_options) -> dict:
    """One timing of each workload (no warm-up; :func:`compare` warms up and repeats).

    ``compile=True``: through a :class:`CompiledRunner` (``runner``, or a new one from ``compile_options``; a new
    one compiles, so time a second call or use :func:`compare`)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    if compile or runner is not None:
        runner = runner or CompiledRunner(model, **compile_options)
        t_pre = runner.prefill(_tokens(vocab, prefill_batch, prefill_len, device, seed))
        t_dec = runner.decode(_tokens(vocab, decode_batch, prompt_len, device, seed + 1), decode_tokens)[0]
        return {"prefill_seconds": t_pre, "decode_seconds": t_dec}
    t_pre = _prefill(model, _tokens(vocab, prefill_batch, prefill_len, device, seed))
    t_dec = _decode(model, _tokens(vocab, decode_batch, prompt_len, device, seed + 1), decode_tokens)[0]
    return {"prefill_seconds": t_pre, "decode_seconds": t_dec}


def compare(dense: nn.Module, pruned: nn.Module, *, repeats: int = 3, warmup: int = 1, prefill_batch: int = 1,
            prefill_len: int = 512, decode_batch: int = 1, prompt_len: int = 32, decode_tokens: int = 32,
            seed: int = 0, progress=None, log=None, compile: bool = False, compile_mode: str = "default",
            decode_compile_mode: str | None = None, compile_backend: str = "inductor",
            fullgraph: bool = True, decode_graph: bool = False, compile_prefill: bool = True,
            runners_out: dict | None = None, decode_attention: str = "sdpa", flex_block: int = 32) -> dict:
    """Time both models (interleaved), return tokens/s, latencies, measured and ideal speed-ups.

    ``compile=True``: both models through a :class:`CompiledRunner` (compiled prefill, static KV cache, decode
    step compiled with ``decode_compile_mode``, default "reduce-overhead" = CUDA graphs on a GPU); the warm-up
    (at least one round) compiles, and each model's warm-up seconds and their excess over the median are reported
    as ``first_call_seconds`` and ``compile_seconds``. ``log``: an optional callable given progress lines.
    ``decode_graph``: see :class:`CompiledRunner`; ``compile_prefill=False`` keeps the prefill eager (for timings
    that are about decoding: skips a compile). ``runners_out``: a dict that receives the two compiled runners
    (to profile or reuse them without compiling again). ``decode_attention="flex"`` switches both models' decode
    steps to FlexAttention (:func:`set_decode_attention`, blocks of ``flex_block`` positions; compiled only) and
    leaves them so."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    _check_decode_attention(decode_attention)
    if decode_attention == "flex":
        if not compile:
            raise ValueError("flex decode attention is a kernel inductor generates: it needs compile=True (eager "
                             "FlexAttention is a slow reference path)")
        for m in (dense, pruned):
            set_decode_attention(m, "flex", block=flex_block)
    if decode_graph and not compile:
        raise ValueError("decode_graph captures the compiled decode step: it needs compile=True")
    kw = dict(prefill_batch=prefill_batch, prefill_len=prefill_len, decode_batch=decode_batch,
              prompt_len=prompt_len, decode_tokens=decode_tokens, seed=seed)
    models = {"dense": dense, "pruned": pruned}
    runners: dict = {k: None for k in models}
    if compile:
        # compilation must happen before the timed repeats; a CUDA graph is recorded at a step's second call
        warmup = max(warmup, 1 if decode_tokens >= 2 else 2)
        runners = {k: CompiledRunner(m, compile_mode=compile_mode, decode_mode=decode_compile_mode,
                                     backend=compile_backend, fullgraph=fullgraph, decode_graph=decode_graph,
                                     compile_prefill=compile_prefill)
                   for k, m in models.items()}
    first: dict[str, dict] = {}
    for w in range(warmup):
        for name, m in models.items():
            t0 = time.perf_counter()
            res = measure(m, runner=runners[name], **kw)
            if w == 0:
                first[name] = {**res, "total_seconds": time.perf_counter() - t0}
            if compile and w == 0 and log is not None:
                log(f"{name}: first (compiling) calls: prefill {res['prefill_seconds']:.1f} s, decode "
                    f"{res['decode_seconds']:.1f} s")
    runs: dict[str, list[dict]] = {k: [] for k in models}
    order = list(models)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate who goes first: drift hits both alike
            runs[name].append(measure(models[name], runner=runners[name], **kw))
        if progress is not None:
            progress(r + 1, repeats)
    if runners_out is not None:
        runners_out.update(runners)
    out: dict = {"measured_on": measured_on(next(dense.parameters()).device),
                 "settings": {**kw, "repeats": repeats, "warmup": warmup,
                              "device": str(next(dense.parameters()).device),
                              "dtype": str(next(dense.parameters()).dtype).replace("torch.", ""),
                              "threads": torch.get_num_threads(), "compile": bool(compile),
                              "decode_attention": decode_attention,
                              "flex_block": flex_block if decode_attention == "flex" else None}}
    if compile:
        out["settings"].update(runners["dense"].settings())
        out["settings"]["compile_counters"] = _compile_counters()
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
            "prefill_seconds_spread": spread(x["prefill_seconds"] for x in runs[name]),
            "decode_seconds_spread": spread(x["decode_seconds"] for x in runs[name]),
            "runs": runs[name],
        }
        if compile:
            f = first[name]
            out[name]["first_call_seconds"] = {"prefill": f["prefill_seconds"], "decode": f["decode_seconds"],
                                               "warmup_round": f["total_seconds"]}
            out[name]["compile_seconds"] = {"prefill": max(0.0, f["prefill_seconds"] - pre),
                                            "decode": max(0.0, f["decode_seconds"] - dec)}
            out[name]["compile_notes"] = list(runners[name].notes)
            out[name]["fullgraph"] = dict(runners[name].fullgraph)
    d, p = out["dense"], out["pruned"]
    ideal = d["linear_flops_per_token"] / p["linear_flops_per_token"]
    out["ideal_speedup"] = ideal
    for work in ("prefill", "decode"):
        key = f"{work}_seconds"
        ratios = spread(a[key] / b[key] for a, b in zip(runs["dense"], runs["pruned"]))  # paired by round
        out[f"{work}_speedup"] = ratios["median"]
        out[f"{work}_speedup_spread"] = ratios
        out[f"{work}_verdict"] = verdict(ratios)
        out[f"{work}_fraction_of_ideal"] = ratios["median"] / ideal
    return out


def structure_report(pruned_dir: str | None, dense_dir: str, *, kept: dict | None = None,
                     threads: int | None = None, prefill_len: int = 256, decode_tokens: int = 16, repeats: int = 7,
                     prefill_batch: int = 1, decode_batch: int = 1, align: int = 64, device: str = "cpu", decode_attention: str = "sdpa",
                     log: Callable[[str], None] | None = None) -> dict:
    """The honest report of a structured output: parameters, file sizes and speed of the materialized model.

    The zeroed model in ``pruned_dir`` is materialized in memory (all-zero FFN units and heads dropped, widths
    padded to ``align``) and written to a temporary folder for its file size; both it and the dense model in
    ``dense_dir`` are then timed (:func:`compare`, batch 1 unless ``prefill_batch``/``decode_batch`` say otherwise) on ``device``: "cpu" (fp32), "cuda" (bf16, compiled
    prefill and CUDA-graph decode, the launch overhead of eager decoding would hide the smaller matmuls) or
    "auto" (CUDA when there is a GPU). ``decode_attention="flex"`` (CUDA only): FlexAttention decode steps for both
    models (:func:`set_decode_attention`).

    ``kept`` (a kept-units JSON as :func:`surgeon.materialized_export.kept_to_json` writes it, e.g. from
    ``surgeon report --save-kept`` on the machine that holds the pruned model) replaces ``pruned_dir``: the
    materialized model then has exactly the pruned model's shapes, with the dense weights at the kept units. Sizes
    and speed depend on shapes only, so this measures a run's structure on a machine that does not hold its
    weights; the report says which weights it timed (``source``), and its ``layers`` are what ``tasks.tracking``'s
    attach checks.

    ``repeats`` interleaved rounds give each speed-up its spread and verdict (module docstring); a model with nothing
    removed gets "no measurable change" whatever its timings. ``log``: called with a line per phase (loading,
    materializing, file sizes, warm-up, each timing round).
    """
    say = log or (lambda _line: None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"structure report device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("structure report device 'cuda' asked for, but torch sees no GPU")
    _check_decode_attention(decode_attention)
    if decode_attention == "flex" and device != "cuda":
        raise ValueError("flex decode attention is for the GPU report: use --device cuda (or auto on a GPU machine)")
    if (pruned_dir is None) == (kept is None):
        raise ValueError("structure report: give the pruned folder or the kept units, exactly one of them")
    on_gpu = device == "cuda"
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                    trust_remote_code=False).eval()

    try:
        say(f"structure report: loading the dense model {dense_dir}")
        dense = load(dense_dir)
        adapter = adapter_for(dense)
        before = count_parameters(dense, adapter)
        if kept is None:
            say(f"structure report: materializing {pruned_dir} (logits checked against the zeroed model)")
            pruned, mat = materialize_checked(load(pruned_dir), align=align)
            source = {"pruned": str(pruned_dir), "weights": "the pruned model's own"}
        else:
            say("structure report: slicing the dense model at the kept units")
            pruned, mat = materialize_model(load(dense_dir), kept_from_json(kept), align=align)
            source = {"kept_units": True, "weights": "dense weights at the kept units (the pruned model's shapes)"}
        after = count_parameters(pruned.eval(), adapter)
        say(f"structure report: parameters {before['total']:,} -> {after['total']:,}; writing the materialized "
            "model for its file size")
        with tempfile.TemporaryDirectory() as tmp:
            save_materialized(pruned, Path(tmp) / "m")
            files = {"dense": safetensors_bytes(dense_dir), "materialized": safetensors_bytes(Path(tmp) / "m")}
            if pruned_dir is not None:
                files["zeroed"] = safetensors_bytes(pruned_dir)
        seqlen = min(prefill_len, getattr(dense.config, "max_position_embeddings", prefill_len))
        if on_gpu:  # after the file sizes: bf16 copies on the GPU
            dense, pruned = (m.to(device="cuda", dtype=torch.bfloat16) for m in (dense, pruned))
        where = measured_on(device)
        say(f"structure report: timing dense and materialized models on {where['name']} ({where['threads']} "
            f"thread(s)), warm-up then {repeats} interleaved rounds")
        res = compare(dense, pruned, repeats=repeats, prefill_len=seqlen, decode_tokens=decode_tokens,
                      prefill_batch=prefill_batch, decode_batch=decode_batch, prompt_len=min(32, seqlen), compile=on_gpu, decode_graph=on_gpu,
                      decode_attention=decode_attention, log=say,
                      progress=lambda r, n: say(f"structure report: timing round {r}/{n}"))
        res["device_name"] = torch.cuda.get_device_name() if on_gpu else "cpu"
        if after["total"] >= before["total"]:  # identical shapes: any measured difference is noise
            res["nothing_removed"] = True
            res["prefill_verdict"] = res["decode_verdict"] = NO_CHANGE
        for k in ("dense", "pruned"):
            res[k].pop("runs", None)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "parameters": {"dense_total": before["total"], "materialized_total": after["total"],
                       "dense_prunable": before["prunable"], "materialized_prunable": after["prunable"],
                       "prunable_fraction": after["prunable"] / before["prunable"]},
        "file_bytes": files, "align": align, "layers": mat["layers"], "source": source, "speed": res,
        "equivalence": mat.get("equivalence", {"skipped": "kept units on the dense weights: no zeroed model"}),
    }
