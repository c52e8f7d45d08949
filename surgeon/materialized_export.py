"""The exporter of materialized models: a pruned (zeroed) model written as a really smaller one, per-layer sliced
matrices in safetensors with their modelling file.

The tensor surgery (dropping all-zero units in memory) is ``surgeon_core.materialize``; this module checks the
smaller model's logits against the zeroed model's, converts the config to the per-layer-size families of
``modeling_surgeon_pruned.py``, saves, copies that file next to the weights (``auto_map``), and registers the
classes with the Auto* factories when imported. Loading the output:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)            # anywhere, offline
    import surgeon.materialized_export; AutoModelForCausalLM.from_pretrained(DIR)  # no remote code needed
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from surgeon_core.adapters import adapter_for
from surgeon_core.materialize import count_parameters, materialize_

from . import modeling_surgeon_pruned as mp
from .errors import SurgeonError
from .utils import atomic_dir

__all__ = ["NothingToMaterialize", "materialize_model", "materialize_checked", "logit_check", "save_materialized",
           "materialize_dir", "safetensors_bytes", "kept_to_json", "kept_from_json", "MODELING_FILE"]

MODELING_FILE = "modeling_surgeon_pruned.py"


class NothingToMaterialize(SurgeonError):
    """The folder has no all-zero FFN unit or attention head (dense, or only unstructured / N:M zeros)."""


_FAMILIES = mp.FAMILIES  # source model_type -> (config class, model class)

for _cfg, _model in {v[0]: v[1] for v in _FAMILIES.values()}.items():
    try:
        AutoConfig.register(_cfg.model_type, _cfg)
        AutoModelForCausalLM.register(_cfg, _model)
    except ValueError:  # already registered (module reloaded)
        pass
    # MLflow's transformers flavour resolves a saved model's class by name in the transformers namespace, and
    # otherwise turns to the folder's remote code; the namespace is the module object in sys.modules now (importing
    # the first model class replaces transformers' lazy module)
    for _cls in (_cfg, _model):
        setattr(sys.modules["transformers"], _cls.__name__, _cls)


def _check_family(config) -> None:
    mt = config.model_type
    if mt not in _FAMILIES:
        sources = sorted(k for k in _FAMILIES if not k.startswith("surgeon_"))
        raise SurgeonError(f"materialize supports {', '.join(sources)}; got model type '{mt}'")


DEFAULT_ALIGN = 64  # FFN widths padded to a multiple of this (see surgeon_core.materialize.pad_kept)


@torch.no_grad()
def materialize_model(model, kept: list[dict] | None = None, align: int = DEFAULT_ALIGN) -> tuple[object, dict]:
    """Slice ``model`` in place and give it the per-layer-size config. Returns (model, report) where the report
    holds the per-layer sizes and the parameter counts dense (zeros included) vs materialized.

    ``kept`` (per layer {"ffn", "heads", "kv"} index tensors, as ``surgeon_core.materialize.find_kept`` returns)
    overrides the default: the units that are not entirely zero. ``align``: FFN widths are padded with all-zero
    units to a multiple of it (1 = no padding), because unaligned matmuls are slow."""
    _check_family(model.config)
    adapter = adapter_for(model)
    before = count_parameters(model, adapter)
    sizes = materialize_(model, adapter, adapter.head_layout(model.config), kept, align)
    cfg_cls, model_cls = _FAMILIES[model.config.model_type]
    d = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        d.pop(key, None)
    cfg = cfg_cls(intermediate_sizes=[s["intermediate_size"] for s in sizes],
                  layer_num_heads=[s["num_heads"] for s in sizes],
                  layer_num_kv_heads=[s["num_kv_heads"] for s in sizes], **d)
    cfg.architectures = [model_cls.__name__]
    cfg.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.{cfg_cls.__name__}",
                    "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_cls.__name__}"}
    model.config = cfg
    after = count_parameters(model, adapter)
    return model, {"layers": sizes, "parameters_before": before, "parameters_after": after, "align": align}


VERIFY_MAX_PARAMETERS = 1_000_000_000  # the float64 check holds the model in float64 (8 bytes per parameter)
FLOAT64_TOLERANCE = 1e-6  # max |Δlogit| in float64 between zeroed and materialized (float64 rounding: ~1e-12)


def _verification_ids(vocab_size: int, batch: int = 2, length: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


@torch.no_grad()
def _logits_fp32_and_float64(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on ``ids`` in float32, then in float64 (the model is converted in place and back: the
    float32 -> float64 -> float32 round trip is exact)."""
    fp32 = model(input_ids=ids, use_cache=False).logits.float()
    model.double()
    try:
        f64 = model(input_ids=ids, use_cache=False).logits
    finally:
        model.float()
    return fp32, f64


def logit_check(zeroed: tuple[torch.Tensor, torch.Tensor], materialized: tuple[torch.Tensor, torch.Tensor],
                tolerance: float = FLOAT64_TOLERANCE) -> dict:
    """Compare the (fp32, float64) logits of the zeroed and the materialized model on the same tokens.

    ``same_function`` is the float64 verdict (the two compute the same function when their float64 logits agree to
    ``tolerance``); the fp32 difference is reported beside the zeroed model's own fp32 rounding error (its fp32 vs
    its float64 logits), because narrower matmuls add the same products in other groups."""
    (z32, z64), (m32, m64) = zeroed, materialized
    d64 = float((m64 - z64).abs().max())
    return {"tokens": int(z32.shape[0] * z32.shape[1]), "max_abs_logit": float(z64.abs().max()),
            "float64_max_abs_diff": d64, "fp32_max_abs_diff": float((m32 - z32).abs().max()),
            "fp32_rounding_of_zeroed": float((z32.double() - z64).abs().max()),
            "float64_tolerance": tolerance, "same_function": d64 <= tolerance}


def materialize_checked(model, kept: list[dict] | None = None, align: int = DEFAULT_ALIGN,
                        verify: bool | None = None) -> tuple[object, dict]:
    """:func:`materialize_model` with a check that the smaller model computes the zeroed model's function: both
    models' logits on 2 x 64 seeded random tokens in fp32 and in float64 (``report["equivalence"]``, see
    :func:`logit_check`). A float64 difference above the tolerance raises :class:`SurgeonError` (the kept units
    dropped something that was not zero). ``verify=None`` checks models up to ``VERIFY_MAX_PARAMETERS``
    parameters (float64 doubles the memory); True / False force it on / off."""
    n = sum(p.numel() for p in model.parameters())
    if verify is None:
        verify = n <= VERIFY_MAX_PARAMETERS
    if not verify:
        model, report = materialize_model(model, kept, align)
        report["equivalence"] = {"skipped": f"({n:,} parameters; verify={verify})"}
        return model, report
    model.eval()
    ids = _verification_ids(model.config.vocab_size,
                            length=min(64, getattr(model.config, "max_position_embeddings", None) or 64))
    zeroed = _logits_fp32_and_float64(model, ids)
    model, report = materialize_model(model, kept, align)
    check = logit_check(zeroed, _logits_fp32_and_float64(model, ids))
    report["equivalence"] = check
    if not check["same_function"]:
        raise SurgeonError(f"the materialized model does not compute the zeroed model's function: float64 logits "
                           f"differ by {check['float64_max_abs_diff']:.3g} (tolerance {check['float64_tolerance']:g}); "
                           "a dropped unit was not entirely zero")
    return model, report


def save_materialized(model, out_dir: str | Path, *, tokenizer=None, report: dict | None = None) -> Path:
    """save_pretrained (safetensors) + the modelling file + materialize.json (sizes and parameter counts)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copy(Path(mp.__file__), out / MODELING_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        (out / "materialize.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def materialize_dir(src: str | Path, out_dir: str | Path, align: int = DEFAULT_ALIGN,
                    verify: bool | None = None) -> dict:
    """Load a pruned model folder, drop its all-zero units, check the smaller model's logits against the zeroed
    model's (:func:`materialize_checked`; nothing is written if it fails), write it; returns the report."""
    src = Path(src).expanduser()
    if not (src / "config.json").is_file():
        raise SurgeonError(f"not a model folder (no config.json): {src}")
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise SurgeonError("materialize: --output must differ from the source folder")
    if out.exists() and any(out.iterdir()):
        raise SurgeonError(f"output {out} exists and is not empty")
    source_config = AutoConfig.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    source_dtype = getattr(source_config, "dtype", None)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a folder without tokenizer files is still a model
        tokenizer = None
    model, report = materialize_checked(model.eval(), align=align, verify=verify)
    if report["parameters_after"]["total"] >= report["parameters_before"]["total"]:
        raise NothingToMaterialize(f"no FFN unit or attention head of {src} is entirely zero: nothing to drop "
                                   "(materialize needs a structured or coupled pruning; unstructured and N:M zeros "
                                   "stay in dense matrices)")
    if isinstance(source_dtype, torch.dtype) and source_dtype.is_floating_point and source_dtype != torch.float32:
        model.to(source_dtype)  # written in the source's dtype (a bf16 model stays bf16: the round trip is exact)
    with atomic_dir(out) as tmp:  # a crash leaves no half-written model behind
        save_materialized(model, tmp, tokenizer=tokenizer, report=report)
    report["output"] = str(out)
    report["file_bytes"] = {"source": safetensors_bytes(src), "materialized": safetensors_bytes(out)}
    return report


def safetensors_bytes(folder: str | Path) -> int:
    """Total size of the ``*.safetensors`` files in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def kept_to_json(kept: list[dict]) -> dict:
    """Kept FFN units / heads / kv groups per layer (``find_kept``'s output) as plain lists."""
    return {"layers": [{k: v.tolist() for k, v in layer.items()} for layer in kept]}


def kept_from_json(data: dict) -> list[dict]:
    """Inverse of :func:`kept_to_json`."""
    return [{k: torch.tensor(v, dtype=torch.long) for k, v in layer.items()} for layer in data["layers"]]
