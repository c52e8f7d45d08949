"""Sharded weights in and out of Hugging Face folders: each process of a sharded-weights shot reads only its own
slices of the decoder weights from the safetensors files, so no process ever holds the whole model.

The model is built with empty (meta) parameters and real buffers (rotary tables), its decoder layers and body are
sharded as :func:`surgeon_core.placement.shard_weights` shards them, the shards are allocated on the compute device,
and every shard is filled from ``safe_open(...).get_slice``. Parameters left whole (the vocabulary head) are read
whole. A ``random:ARCH`` model is drawn the same way, each rank drawing its own slices (:func:`random_sharded`), so
no process ever builds the whole model. :func:`save_sharded` writes such a model back as a Hugging Face folder
with torch.distributed.checkpoint's Hugging Face writer: every rank writes its slices, which are then joined into
whole tensors, file by file, so no process gathers the whole model in memory. Without an initialised process group
there is nothing to shard: use :func:`surgeon.models.load_model` and :func:`surgeon.models.save_model`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from surgeon_core.adapters import adapter_for
from surgeon_core.placement import local_part, shard_rows, shard_weights

from .errors import SurgeonError

__all__ = ["load_sharded", "random_sharded", "save_sharded", "can_load_sharded", "shard_rows", "file_of_tensors"]


def can_load_sharded(folder: str | Path) -> bool:
    """Whether ``folder`` is a plain Hugging Face folder of safetensors weights (not GGUF, not a materialized model)."""
    from .models import MATERIALIZED_PREFIX, _raw_model_type

    folder = Path(folder)
    model_type = _raw_model_type(folder / "config.json") if (folder / "config.json").is_file() else None
    return (model_type is not None and not model_type.startswith(MATERIALIZED_PREFIX)
            and bool(_weight_index(folder)))


def _weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards listed in the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _sharded_empty(config, dtype: torch.dtype, device):
    """``config``'s architecture sharded over the running process group, each rank's slices allocated (not
    initialised) on ``device``; the buffers (rotary tables) are computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    shard_weights(model, adapter_for(model))
    model.to_empty(device=device)
    for name, value in buffers.items():  # to_empty leaves the buffers uninitialised
        model.get_buffer(name).copy_(value)
    return model.eval()


def _in_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise SurgeonError("sharded weights need an initialised process group (the processes of one shot)")


def _source_key(name: str, index: dict[str, Path], model) -> str:
    """The files' name for parameter ``name``; a tied vocabulary head, saved once, reads the input embeddings."""
    if name in index:
        return name
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is not None and getattr(text, "tie_word_embeddings", False) and names.get(id(head.weight)) == name:
        return names[id(embed.weight)]
    raise SurgeonError(f"the weight files hold no tensor '{name}' (their names differ from the architecture's)")


def _fill(model, folder: Path, dtype: torch.dtype) -> None:
    """Every parameter from the files: a DTensor shard reads its own rows, a whole parameter the whole tensor."""
    index = _weight_index(folder)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            key = _source_key(name, index, model)
            if index[key] not in handles:
                handles[index[key]] = stack.enter_context(safe_open(index[key], framework="pt"))
            view = handles[index[key]].get_slice(key)
            if tuple(view.get_shape()) != tuple(p.shape):
                raise SurgeonError(f"{key}: shape {tuple(view.get_shape())} in the files, {tuple(p.shape)} in the "
                                   "architecture")
            if isinstance(p, DTensor) and p.placements[0].is_shard():
                start, rows = shard_rows(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())
                part = view[start:start + rows]
            else:
                part = view[:]
            with torch.no_grad():
                local_part(p).copy_(part.to(dtype))


def load_sharded(folder: str | Path, *, dtype: torch.dtype, device: str | torch.device):
    """``(model, tokenizer)`` of a safetensors model folder with its decoder layers and body sharded over the running
    process group (FSDP2), each process reading only its slices; the vocabulary head is whole on every process."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    _in_group()
    if not can_load_sharded(folder):
        raise SurgeonError(f"{folder} is not a safetensors model folder that can be read in slices")
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = _sharded_empty(config, dtype, device)
    _fill(model, folder, dtype)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return model, None  # a checkpoint of a random architecture has no tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise SurgeonError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from exc
    return model, tok


@torch.no_grad()
def random_sharded(ref: str, *, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A ``random:ARCH`` model sharded over the running process group, each rank drawing only its slices: weights
    normal with the configuration's ``initializer_range`` (Llama's initialisation), norms 1. The draw depends on the
    seed, the parameter and the rank, so it differs from :func:`surgeon.inputs.random_model`'s whole-model draw."""
    from .inputs import random_config

    _in_group()
    config = random_config(ref)
    model = _sharded_empty(config, dtype, device)
    rank = torch.distributed.get_rank()
    for i, (name, p) in enumerate(model.named_parameters(remove_duplicate=False)):
        local = local_part(p)
        if local.dim() == 1:  # RMSNorm weights
            local.fill_(1.0)
            continue
        g = torch.Generator(device=local.device).manual_seed(seed * 1_000_003 + i * 1_009 + rank)
        local.copy_(torch.randn(local.shape, generator=g, device=local.device, dtype=torch.float32)
                    .mul_(config.initializer_range))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if config.tie_word_embeddings and head.weight is not embed.weight:  # sharding separated the tied pair
        head.weight.copy_(embed.weight.full_tensor() if isinstance(embed.weight, DTensor) else embed.weight)
    return model


def file_of_tensors(sizes: dict[str, int], files: int) -> dict[str, int]:
    """Tensor name -> file index (1..files): names in order, each file holding about the same number of bytes."""
    total, out, acc = sum(sizes.values()) or 1, {}, 0
    for name, size in sizes.items():
        out[name] = min(files, 1 + acc * files // total)
        acc += size
    return out


def save_sharded(model, tokenizer, out_dir: str | Path, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model with FSDP2-sharded weights as a Hugging Face folder (``model-0000i-of-0000N.safetensors`` and
    their index, one file per process), atomically, from every rank of the running process group at once. Rank 0
    writes the configuration, the tokenizer and ``extra_files`` and renames the finished folder into place."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from surgeon_core import distributed

    from .models import _make_serializable
    from .utils import atomic_dir, atomic_write

    _in_group()
    dp = distributed.resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    state = get_model_state_dict(model)
    sizes = {k: v.numel() * v.element_size() for k, v in sorted(state.items())}
    mapping = file_of_tensors(sizes, dp.world_size if dp else 1)
    main = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:  # rank 0's temporary folder, renamed into place when all is written
        tmp = stack.enter_context(atomic_dir(out_dir)) if main else None
        tmp = Path(distributed.broadcast_object(str(tmp), dp) if dp else tmp)
        save(state, storage_writer=HuggingFaceStorageWriter(
            str(tmp), fqn_to_index_mapping=mapping, save_distributed=True, enable_consolidation=True,
            thread_count_consolidation=len(set(mapping.values()))))
        dist.barrier()
        if main:
            shutil.rmtree(tmp / "sharded", ignore_errors=True)  # the per-rank slices, now joined
            _make_serializable(model)
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, data in (extra_files or {}).items():
                atomic_write(tmp / name, data)
    dist.barrier()  # the folder is in place before any rank goes on
    return out_dir
