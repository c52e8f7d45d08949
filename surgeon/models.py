"""Loading and saving causal LMs: local Hugging Face folders, GGUF files (de-quantized) and Hub ids.

``load_model(ref)`` returns ``(model, tokenizer, ModelInfo)``. Every failure a user can cause (missing path,
corrupt or truncated weights, unsupported architecture, Hub unreachable) raises :class:`SurgeonError` with a
one-line message.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from surgeon_core.adapters import (ADAPTERS, UnsupportedArchitectureError, adapter_for, derive_adapter, moe_reason,
                                   table_model_types)
from surgeon_core.methods import DTYPES

from .errors import SurgeonError
from .utils import atomic_dir, atomic_write, sha256_bytes, sha256_file

__all__ = ["ModelInfo", "load_model", "save_model", "model_content_hash", "parse_dtype",
           "SUPPORTED_MODEL_TYPES", "check_finite"]

SUPPORTED_MODEL_TYPES = tuple(sorted({t for a in ADAPTERS for t in a.model_types}))
_SUPPORTED = ", ".join(table_model_types())  # as named in messages
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
HUB_TIMEOUT_S = 4.0

_LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its short (``bf16``) or long (``bfloat16``) name, through the core's one map."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    try:
        return DTYPES[_LONG_NAMES.get(key, key)]
    except KeyError:
        raise SurgeonError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})") from None


@dataclass
class ModelInfo:
    ref: str  # what the user passed
    path: str  # resolved local folder or GGUF file; the Hub id for Hub models
    source: str  # "dir" | "gguf" | "hub"
    model_type: str  # config.model_type, e.g. "llama"
    family: str  # adapter family, e.g. "llama"
    num_parameters: int  # unique parameters (tied embeddings counted once)
    content_hash: str  # sha256 over config + weight files (GGUF: the file)
    dtype: str
    max_position_embeddings: int | None = None
    num_layers: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------- hashing

def _weight_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sorted(files, key=lambda p: p.name)


def model_content_hash(path: str | os.PathLike, *, use_cache: bool = False) -> str:
    """sha256 over ``config.json`` and the weight files of a folder (name + file hash), or over a GGUF file.

    Identity by content: every file is read and hashed, since the run's cache keys and the manifest's source hash
    depend on it (a same-size file swapped in with the old mtime is a new model). ``use_cache``: reuse the file
    hashes :func:`surgeon.utils.sha256_file` recorded, for reports that decide nothing.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path, use_cache=use_cache)
    parts = []
    for f in [path / "config.json", *_weight_files(path)]:
        if f.exists():
            parts.append(f"{f.name}\t{sha256_file(f, use_cache=use_cache)}")
    return sha256_bytes("\n".join(parts))


# --------------------------------------------------------------------------------------------------- checks

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _check_model_type(model_type: str | None, where: str, config=None) -> None:
    """Refuse before any weight is read: a mixture of experts, or a type without a table entry whose module names
    (of the model built from ``config`` on the meta device) give no derived adapter."""
    reason = moe_reason(config) if config is not None else moe_reason(type("C", (), {"model_type": model_type}))
    if reason is not None:
        raise SurgeonError(f"unsupported architecture '{model_type}' in {where}: mixture-of-experts model ({reason}); "
                           "experts are not pruned")
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    if config is None and model_type is not None:
        return  # a GGUF architecture name: the adapter is derived and checked once the model is loaded
    try:
        if config is None:
            raise UnsupportedArchitectureError("no model_type in its config")
        with torch.device("meta"):
            derive_adapter(AutoModelForCausalLM.from_config(config, trust_remote_code=False), verify=False)
    except UnsupportedArchitectureError as exc:
        raise SurgeonError(f"unsupported architecture '{model_type}' in {where}: no adapter for it and none derived "
                           f"from its module names: {exc.reason} (supported model types: {_SUPPORTED}, or a "
                           "Llama-like layout)") from None
    except Exception as exc:  # noqa: BLE001 - transformers has no model class for this config
        raise SurgeonError(f"unsupported architecture '{model_type}' in {where}: no causal LM for it "
                           f"({_first_line(exc)}; supported model types: {_SUPPORTED})") from None


def _check_safetensors(files: list[Path]) -> None:
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:  # touching one tensor checks that the data section is really there
                    st.get_slice(keys[-1])
        except Exception as exc:  # safetensors raises its own error type for bad headers/short files
            raise SurgeonError(f"corrupt or truncated safetensors file {f}: {_first_line(exc)}") from exc
        size = f.stat().st_size
        if size < 8:
            raise SurgeonError(f"corrupt or truncated safetensors file {f}: only {size} bytes")


def _read_gguf_architecture(path: Path) -> str:
    try:
        import gguf  # lazy: transformers' GGUF support, for .gguf files only
    except ImportError as exc:  # pragma: no cover - gguf is a pinned dependency
        raise SurgeonError("loading GGUF files needs the 'gguf' package (pip install gguf)") from exc
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SurgeonError(f"not a GGUF file (bad magic bytes): {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        return bytes(field_.parts[field_.data[0]]).decode("utf-8")
    except SurgeonError:
        raise
    except Exception as exc:
        raise SurgeonError(f"corrupt or truncated GGUF file {path}: {_first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------------- Hub

_HUB_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True if a TCP connection to the Hub endpoint opens within ``timeout`` seconds (DNS included)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=timeout)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def looks_like_path(ref: str) -> bool:
    return (
        ref.startswith((".", "/", "~"))
        or ref.endswith(WEIGHT_SUFFIXES)
        or ref.count("/") > 1
        or os.sep != "/" and os.sep in ref
        or not _HUB_ID.match(ref)
    )


# --------------------------------------------------------------------------------------------------- loading

def _finish(model, dtype: torch.dtype, device) -> torch.nn.Module:
    _make_serializable(model)
    model = model.to(device=device)
    model.eval()
    return model


def _make_serializable(model) -> None:
    """Drop the GGUF quantizer state: the weights are already dense, but save_pretrained refuses otherwise."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _validate_adapter(model, where: str) -> str:
    try:
        return adapter_for(model).family
    except UnsupportedArchitectureError as exc:
        raise SurgeonError(f"{where}: {_first_line(exc)}") from exc


def _info(ref, path, source, model, dtype, content_hash, **extra) -> ModelInfo:
    cfg = model.config
    return ModelInfo(
        ref=str(ref),
        path=str(path),
        source=source,
        model_type=cfg.model_type,
        family=_validate_adapter(model, str(path)),
        num_parameters=sum(p.numel() for p in model.parameters()),
        content_hash=content_hash,
        dtype=str(dtype).replace("torch.", ""),
        max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        num_layers=getattr(cfg, "num_hidden_layers", None),
        extra=extra,
    )


MATERIALIZED_PREFIX = "surgeon_pruned_"  # model_type of the per-layer-size (materialized) families


def _register_materialized(model_type: str | None) -> None:
    """Register the materialized model classes with the Auto* factories when a folder holds one (their import pulls
    every family's modelling code, so only then)."""
    if model_type and model_type.startswith(MATERIALIZED_PREFIX):
        from . import materialized_export  # noqa: F401


def _load_dir(ref: str, folder: Path, dtype, device):
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ref, ggufs[0], dtype, device)
        raise SurgeonError(f"not a Hugging Face model folder (no config.json): {folder}")
    _register_materialized(_raw_model_type(folder / "config.json"))
    weights = _weight_files(folder)
    if not any(w.suffix in (".safetensors", ".bin") for w in weights):
        raise SurgeonError(f"no weight files (*.safetensors) in model folder {folder}")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        model_type = _raw_model_type(folder / "config.json")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise SurgeonError(f"unsupported architecture '{model_type}' in {folder}: transformers has no config "
                               f"class for it (supported model types: {_SUPPORTED}, or a Llama-like layout)") from None
        raise SurgeonError(f"cannot read {folder / 'config.json'}: {_first_line(exc)}") from exc
    _check_model_type(getattr(config, "model_type", None), str(folder), config)
    _check_safetensors(weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
    except Exception as exc:
        raise SurgeonError(f"cannot load model weights from {folder}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise SurgeonError(f"cannot load the tokenizer from {folder}: {_first_line(exc)}") from exc
    model = _finish(model, dtype, device)
    return model, tokenizer, _info(ref, folder, "dir", model, dtype,
                                   model_content_hash(folder, use_cache=True))


def _raw_model_type(config_json: Path) -> str | None:
    try:
        return json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_gguf(ref: str, file: Path, dtype, device):
    arch = _read_gguf_architecture(file)
    _check_model_type(arch, str(file))
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True,
                                                  trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype,
                                                     local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise SurgeonError(f"cannot convert GGUF file {file}: {_first_line(exc)}") from exc
    model = _finish(model, dtype, device)
    return model, tokenizer, _info(ref, file, "gguf", model, dtype, model_content_hash(file, use_cache=True),
                                   note="GGUF weights de-quantized to dense tensors")


def _load_hub(ref: str, dtype, device):
    from . import materialized_export  # noqa: F401 - its config may be a materialized family's
    repo = ref[3:] if ref.startswith("hf:") else ref

    def load(local_only: bool):
        config = AutoConfig.from_pretrained(repo, local_files_only=local_only, trust_remote_code=False)
        _check_model_type(getattr(config, "model_type", None), f"Hub model '{repo}'", config)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, local_files_only=local_only,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=local_only, trust_remote_code=False)
        return model, tokenizer

    offline = hub_offline()
    try:  # the local Hub cache works with or without network
        model, tokenizer = load(local_only=True)
    except SurgeonError:
        raise
    except Exception:
        if offline:
            raise SurgeonError(
                f"'{ref}' is not a local path, and Hub model '{repo}' is not in the local cache while the "
                "Hub is offline (HF_HUB_OFFLINE=1); pass a local folder or GGUF file "
                "(e.g. `surgeon fetch-model smollm2-135m --output DIR`)"
            ) from None
        if not hub_reachable():
            raise SurgeonError(
                f"'{ref}' is not a local path, and the Hugging Face Hub is unreachable (no connection within "
                f"{HUB_TIMEOUT_S:.0f} s) to fetch '{repo}'; pass a local folder or GGUF file"
            ) from None
        try:
            model, tokenizer = load(local_only=False)
        except SurgeonError:
            raise
        except Exception as exc:
            raise SurgeonError(f"cannot load Hub model '{repo}': {_first_line(exc)}") from exc
    model = _finish(model, dtype, device)
    revision = getattr(model.config, "_commit_hash", None) or ""
    return model, tokenizer, _info(ref, repo, "hub", model, dtype, sha256_bytes(f"hub:{repo}@{revision}"),
                                   revision=revision)


def load_model(ref: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """Load ``(model, tokenizer, ModelInfo)`` from a local HF folder, a GGUF file or a Hub id.

    GGUF weights are de-quantized to dense ``dtype`` tensors; the quantizer state is removed so the model can be
    saved with :func:`save_model`.
    """
    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    ref_s = str(ref)
    if not ref_s.strip():
        raise SurgeonError("empty model reference")
    path = Path(ref_s).expanduser()
    if ref_s.startswith("hf:"):
        out = _load_hub(ref_s, dtype, device)
    elif path.is_dir():
        out = _load_dir(ref_s, path.resolve(), dtype, device)
    elif path.is_file():
        if path.suffix.lower() == ".gguf":
            out = _load_gguf(ref_s, path.resolve(), dtype, device)
        elif path.name == "config.json":
            out = _load_dir(ref_s, path.resolve().parent, dtype, device)
        else:
            raise SurgeonError(f"unsupported model file {path}: expected a model folder or a .gguf file")
    elif path.exists():
        raise SurgeonError(f"model path is neither a folder nor a file: {path}")
    elif looks_like_path(ref_s):
        raise SurgeonError(f"model path not found: {path}")
    else:
        out = _load_hub(ref_s, dtype, device)
    check_finite(out[0], out[2].path)
    out[2].extra.setdefault("load_seconds", round(time.perf_counter() - t0, 3))
    return out


def check_finite(model: torch.nn.Module, where: str) -> None:
    """Refuse weights holding NaN/Inf (a corrupt or diverged model): pruning them would only spread the NaNs."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise SurgeonError(f"model weights hold NaN/Inf: {name} has {bad} non-finite value(s) in {where}")


# --------------------------------------------------------------------------------------------------- saving

def save_model(model, tokenizer, out_dir: str | os.PathLike, *, extra_files: dict[str, bytes | str] | None = None,
               overwrite: bool = True, finalize=None) -> Path:
    """Write ``model`` (safetensors), ``tokenizer`` and ``extra_files`` to a Hugging Face folder, atomically.

    Everything is written to a temporary folder next to ``out_dir`` which is renamed into place at the end, so
    an interrupted save never leaves a folder that looks complete. ``finalize(tmp_folder)`` runs last, before the
    rename (e.g. to write a manifest of the finished files). Returns the final path.
    """
    out_dir = Path(out_dir).expanduser()
    _make_serializable(model)
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, data in (extra_files or {}).items():
                rel = Path(name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise SurgeonError(f"extra file name must be relative inside the model folder: {name}")
                atomic_write(tmp / rel, data)
            if finalize is not None:
                finalize(tmp)
    except FileExistsError as exc:
        raise SurgeonError(f"cannot write model folder: {exc}") from exc
    except OSError as exc:
        raise SurgeonError(f"cannot write model folder {out_dir}: {_first_line(exc)}") from exc
    return out_dir.resolve()
