"""The run's inputs, resolved once before any work: the model (fetched or converted to a local folder, identified by
its content hash) and the token windows of calibration and evaluation (cached as .npy, identified by a data id).
Every function takes and returns references (paths, ids), never a model, so Prefect tasks can wrap them."""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgeon_core.adapters import adapter_for, prunable_linears
from surgeon_core.finetune import sample_windows
from surgeon_core.methods import DTYPES, Structure
from transformers import AutoConfig, AutoTokenizer

from .config import GENERATED, PruneConfig
from .data import (calibration_windows, check_seqlen, data_id, eval_windows, load_ids, read_cached_ids,
                   write_cached_ids)
from .errors import SurgeonError
from .fetch import fetch_model, known_models
from .integrity import read_record, write_record
from .models import load_model, model_content_hash, save_model
from .outputs import check_output
from .utils import atomic_write, cache_dir, sha256_bytes, sha256_file

__all__ = ["ModelRef", "DataRef", "RANDOM_ARCHS", "random_config", "random_model", "prepare_model", "validate_model",
           "build_calibration", "build_eval", "build_finetune", "load_source_model", "load_windows", "preflight"]


@dataclass(frozen=True)
class ModelRef:
    path: str
    content_hash: str


@dataclass(frozen=True)
class DataRef:
    path: str
    data_id: str
    shape: tuple[int, ...]


_log = logging.getLogger("surgeon.inputs")
RANDOM = "random:"
# decoder shapes for random-weight models (speed and memory measurements; their quality means nothing)
RANDOM_ARCHS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def _random_arch(ref: str) -> dict:
    arch = ref.removeprefix(RANDOM)
    if arch not in RANDOM_ARCHS:
        raise SurgeonError(f"unknown random architecture {arch!r}; known: {', '.join(RANDOM_ARCHS)}")
    return RANDOM_ARCHS[arch]


def random_config(ref: str):
    """The Llama configuration of a ``random:ARCH`` model."""
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, **_random_arch(ref))


def random_model(ref: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Llama-architecture model with random weights (``random:llama-2-7b``), built on ``device`` directly."""
    from transformers import LlamaForCausalLM

    config = random_config(ref)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def prepare_model(cfg: PruneConfig) -> ModelRef:
    """Resolve ``cfg.model`` to a local HF folder (fetching/converting registered names and GGUF files once); a
    ``random:ARCH`` model stays a reference, built where it runs."""
    ref = cfg.model
    if ref.startswith(RANDOM):
        _random_arch(ref)
        return ModelRef(ref, sha256_bytes(ref.encode()))
    if ref in known_models():
        path = fetch_model(ref, cache_dir("models") / ref)
    elif ref.lower().endswith(".gguf"):
        src = Path(ref).expanduser()
        if not src.is_file():
            raise SurgeonError(f"model path not found: {src}")
        path = cache_dir("models") / f"gguf-{sha256_file(src)[:16]}"
        if not (path / "config.json").exists():
            model, tok, _ = load_model(src)
            save_model(model, tok, path)
    else:
        path = Path(ref).expanduser()
        if not path.is_dir():
            model, tok, _ = load_model(ref)  # Hub id (fails fast offline) or a clear error
            path = cache_dir("models") / ("hub-" + ref.replace("/", "--"))
            save_model(model, tok, path)
    path = Path(path).resolve()
    content_hash = model_content_hash(path)
    validate_model(str(path), cfg, content_hash)
    return ModelRef(str(path), content_hash)


def validate_model(model_path: str, cfg: PruneConfig, content_hash: str | None = None) -> None:
    """Load the model once on the CPU and refuse, with one line, what a shot would fail on hours later: corrupt or
    truncated files, an unsupported architecture, NaN/Inf weights (all in :func:`load_model`), and an N:M
    structure whose M does not divide every prunable layer's input dimension. A success is remembered per content
    hash and structure (``$SURGEON_CACHE/validated``), so a large model is read for this only once."""
    marker = cache_dir("validated") / f"{content_hash[:32]}-{cfg.method.structure.replace(':', 'of')}.json" \
        if content_hash else None
    marker_key = f"validated-{content_hash}-{cfg.method.structure}"
    if marker is not None and read_record(marker, marker_key)[0] is not None:  # signed: a forged one is ignored
        return
    model, _, _ = load_model(model_path, dtype=torch.float32, device="cpu")
    st = Structure.parse(cfg.method.structure)
    if st.kind == "nm":
        bad = [(n, lin.in_features) for n, lin in prunable_linears(model, adapter_for(model)).items()
               if lin.in_features % st.m]
        if bad:
            raise SurgeonError(f"{st} sparsity needs every prunable layer's input dimension divisible by {st.m}: "
                               f"{bad[0][0]} has {bad[0][1]} inputs ({len(bad)} layer(s) affected)")
    del model
    if marker is not None:
        write_record(marker, marker_key, {"model": model_path})


def _random_windows(ref: str, vocab: int, seed: int) -> torch.Tensor:
    n, _, seqlen = ref.removeprefix(RANDOM).partition("x")
    if not (n.isdigit() and seqlen.isdigit() and int(n) > 0 and int(seqlen) > 1):
        raise SurgeonError(f"random calibration data is 'random:NxL' (windows x tokens), not {ref!r}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (int(n), int(seqlen)), generator=gen)


def _tokenizer(model_path: str):
    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except Exception:  # a folder without tokenizer: only .npy data can be used
        return None


def _save_windows(windows: torch.Tensor, did: str, kind: str) -> DataRef:
    """The windows as ``.npy`` in the cache, named by their id; a cached file that does not hold exactly these
    windows (corrupt, truncated, replaced) is rewritten with a warning."""
    path = cache_dir("data") / f"{kind}-{did[:20]}.npy"
    if path.exists():
        try:
            if torch.equal(load_windows(str(path)), windows.long()):
                return DataRef(str(path), did, tuple(windows.shape))
            problem = "holds other windows"
        except (OSError, ValueError) as exc:
            problem = f"cannot be read ({str(exc).splitlines()[0][:120]})"
        _log.warning("cached %s windows %s %s; rebuilding it", kind, path, problem)
    buf = io.BytesIO()
    np.save(buf, windows.numpy().astype(np.int32))
    atomic_write(path, buf.getvalue())
    return DataRef(str(path), did, tuple(windows.shape))


def _model_config(model_path: str):
    if model_path.startswith(RANDOM):
        from transformers import LlamaConfig

        return LlamaConfig(max_position_embeddings=4096, **_random_arch(model_path))
    return AutoConfig.from_pretrained(model_path, trust_remote_code=False)


def _check_embedding(windows: torch.Tensor, config, source: str) -> None:
    """Every token id indexes the model's embedding (a tokenizer may know more tokens than the model embeds)."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(windows.max()) >= int(vocab):
        raise SurgeonError(f"{source} holds token id {int(windows.max())}, beyond the model's embedding of "
                           f"{vocab} tokens")


def build_calibration(cfg: PruneConfig, model_path: str) -> DataRef:
    """Tokenize the calibration source once and draw ``nsamples`` windows of ``seqlen`` tokens (seeded)."""
    c = cfg.calibration
    config = _model_config(model_path)
    check_seqlen(c.seqlen, config)
    if c.data.startswith(RANDOM):  # random:NxL token windows (speed measurements)
        windows = _random_windows(c.data, config.vocab_size, c.seed)
        return _save_windows(windows, data_id(windows, source=c.data, seed=c.seed), "calib")
    ids = load_ids(c.data, _tokenizer(model_path), split=c.split, column=c.column, join=None)
    if ids.dim() == 1 and ids.numel() < c.nsamples * c.seqlen:
        raise SurgeonError(f"calibration corpus {c.data} has {ids.numel()} tokens, fewer than nsamples x "
                           f"seqlen = {c.nsamples} x {c.seqlen} = {c.nsamples * c.seqlen} (the windows would "
                           "mostly repeat); give more text or fewer/shorter windows")
    windows = calibration_windows(ids, c.nsamples, c.seqlen, c.seed)
    _check_embedding(windows, config, c.data)
    did = data_id(windows, source=c.data, seed=c.seed)
    return _save_windows(windows, did, "calib")


def build_eval(cfg: PruneConfig, model_path: str) -> DataRef | None:
    e = cfg.eval
    if e.data is None:
        return None
    seqlen = e.seqlen or cfg.calibration.seqlen
    check_seqlen(seqlen, _model_config(model_path))
    ids = load_ids(e.data, _tokenizer(model_path), split=e.split, column=e.column,
                   max_tokens=e.max_windows * seqlen if e.max_windows else None)
    windows = eval_windows(ids, seqlen, e.max_windows)
    _check_embedding(windows, _model_config(model_path), e.data)
    did = data_id(windows, source=e.data)
    return _save_windows(windows, did, "eval")


def build_finetune(cfg: PruneConfig, model: ModelRef, calibration: DataRef, log=None) -> DataRef | None:
    """The windows fine-tuning trains and validates on, None when fine-tuning is off or uses the calibration
    windows. ``finetune.data`` a text: cut into non-overlapping windows of ``calibration.seqlen`` tokens (the first
    ``finetune.windows``); ``generated``: ``finetune.windows`` windows (default ``calibration.nsamples``) sampled
    from the dense model (:func:`surgeon_core.finetune.sample_windows`), each starting with the first token of a
    calibration window, cached per model, count, length and seed; ``log`` gets the sampling's progress."""
    f, seqlen = cfg.finetune, cfg.calibration.seqlen
    if f.data is None or not f.active:
        return None
    if f.data == GENERATED:
        return _generated_windows(cfg, model, calibration, log or _log)
    ids = load_ids(f.data, _tokenizer(model.path), join=None,
                   max_tokens=f.windows * seqlen if f.windows else None)
    windows = eval_windows(ids, seqlen, f.windows)
    if windows.shape[1] != seqlen:  # ready-made (n, L) windows from a .npy file
        raise SurgeonError(f"finetune.data {f.data} holds windows of {windows.shape[1]} tokens, not "
                           f"calibration.seqlen = {seqlen}")
    if f.windows and windows.shape[0] < f.windows:
        raise SurgeonError(f"finetune.data {f.data} holds {windows.shape[0]} windows of {seqlen} tokens, fewer "
                           f"than finetune.windows = {f.windows}")
    if f.holdout > 0 and windows.shape[0] <= f.holdout_min:
        raise SurgeonError(f"finetune.data {f.data} holds {windows.shape[0]} windows of {seqlen} tokens: "
                           f"validation needs more than finetune.holdout_min = {f.holdout_min}; give more text, "
                           "or set finetune.holdout=0")
    _check_embedding(windows, _model_config(model.path), f.data)
    return _save_windows(windows, data_id(windows, source=f.data), "finetune")


def _generated_windows(cfg: PruneConfig, model: ModelRef, calibration: DataRef, log) -> DataRef:
    """Windows sampled from the dense model, read from the cache when this model, count, length, start tokens and
    seed made them before (a signed record vouches for the file's bytes)."""
    f, c = cfg.finetune, cfg.compute
    n, seqlen, seed = f.windows or cfg.calibration.nsamples, cfg.calibration.seqlen, cfg.method.seed
    calib = load_windows(calibration.path)
    starts = calib[torch.arange(n) % calib.shape[0], 0]
    params = dict(model=model.content_hash, n=n, seqlen=seqlen, seed=seed, starts=calibration.data_id,
                  model_dtype=c.model_dtype, dtype=c.dtype, batch_size=c.batch_size)
    key = sha256_bytes(json.dumps(params, sort_keys=True))
    path = cache_dir("data") / f"{GENERATED}-{key[:20]}.npy"
    windows = read_cached_ids(path, key)
    if windows is None:
        windows = _sample(cfg, model, starts, seqlen, seed, log)
        write_cached_ids(path, key, windows.numpy(), **params)
    return DataRef(str(path), data_id(windows, source=GENERATED, seed=seed), tuple(windows.shape))


def load_source_model(source: str, cfg: PruneConfig, device: str | None = None):
    """(model, tokenizer or None) of a local folder or a ``random:ARCH`` reference, in ``compute.model_dtype`` on
    ``device`` (default the compute device)."""
    dtype, device = DTYPES[cfg.compute.model_dtype], device or cfg.compute.device
    if source.startswith(RANDOM):
        return random_model(source, device=device, dtype=dtype, seed=cfg.method.seed), None
    model, tok, _ = load_model(source, dtype=dtype, device=device)
    return model, tok


def _sample(cfg: PruneConfig, model: ModelRef, starts: torch.Tensor, seqlen: int, seed: int, log) -> torch.Tensor:
    c = cfg.compute
    dense, _ = load_source_model(model.path, cfg)
    t0, logged = time.perf_counter(), [-1]

    def progress(done: int, total: int) -> None:  # about every tenth of the windows
        if done * 10 // total > logged[0]:
            logged[0] = done * 10 // total
            log.info("sampling fine-tuning windows from the dense model: %d/%d (%.0f s)", done, total,
                     time.perf_counter() - t0)

    batch = sampling_batch(dense.config, seqlen, starts.numel(), c.batch_size)
    log.info("sampling %d fine-tuning windows of %d tokens from the dense model, %d at a time", starts.numel(),
             seqlen, batch)
    windows = sample_windows(dense, starts, seqlen, batch_size=batch, seed=seed, device=c.device,
                             autocast_dtype=torch.bfloat16 if c.dtype == "bf16" else None, progress=progress)
    del dense
    return windows


SAMPLING_CACHE_BYTES = 4 * 2**30  # key/value cache of the windows sampled together


def sampling_batch(config, seqlen: int, n: int, floor: int) -> int:
    """Windows sampled together: as many as a key/value cache of ``SAMPLING_CACHE_BYTES`` (fp32) holds, at least
    ``floor`` (compute.batch_size) and at most ``n``. One token a step, a sampling step costs about the same for
    one window as for many, so the batch sets the speed."""
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return max(1, min(n, floor))
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_window = 2 * layers * kv_heads * head_dim * seqlen * 4
    return max(1, min(n, max(floor, SAMPLING_CACHE_BYTES // per_window)))


def load_windows(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))


def preflight(cfg: PruneConfig, log=None) -> tuple[ModelRef, DataRef, DataRef | None, DataRef | None]:
    """Every check that can fail on the user's input, before any pruning: the output folder (policy of
    :func:`surgeon.outputs.check_output`), the model (:func:`validate_model`), calibration, evaluation and
    fine-tuning data (found, long enough, ``seqlen`` within the model's context). Raises :class:`SurgeonError`;
    writes nothing but the caches (converted models, token ids, sampled windows; ``log`` gets the sampling's
    progress). Returns what it resolved: the model and the calibration, evaluation and fine-tuning windows (None
    where there are none)."""
    out = cfg.output
    if out.path:
        check_output(out.path, config_hash=cfg.config_hash(), overwrite=out.overwrite, sources=[cfg.model])
    src = prepare_model(cfg)
    if out.path:
        check_output(out.path, config_hash=cfg.config_hash(), source_model=src.content_hash,
                     overwrite=out.overwrite, sources=[cfg.model, src.path])
    calibration = build_calibration(cfg, src.path)
    return src, calibration, build_eval(cfg, src.path), build_finetune(cfg, src, calibration, log)
