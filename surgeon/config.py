"""One validated configuration (a "recipe") for a pruning run: YAML file + ``key=value`` overrides + CLI flags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgeon_core.methods import METHODS, Structure

from .errors import SurgeonError

__all__ = ["PruneConfig", "load_recipe", "parse_overrides", "WEIGHT_FIELDS"]

# fields that change the pruned weights (the cache key); output/tracking/evaluation fields are not in it
WEIGHT_FIELDS = (
    "model", "method", "structure", "target_size", "shots", "calibration", "calibration_column",
    "calibration_split", "nsamples", "seqlen", "calibration_seed", "seed", "damping_a", "damping_g", "fisher",
    "fisher_samples", "max_correlate", "structured_update", "coupled_score", "batch_size", "compute_dtype", "gram_dtype", "finetune_steps", "final_finetune_steps",
    "finetune_lr", "finetune_train", "finetune_schedule", "finetune_warmup", "finetune_batch_size", "first_order",
    "first_order_scale", "finetune_holdout", "finetune_validate_every",
)


class PruneConfig(BaseModel):
    """A pruning recipe. ``target_size`` is the fraction of prunable linear weights kept (0.7 = "70% size")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="local HF folder, .gguf file, Hub id, or a fetchable name such as smollm2-135m")
    output: str | None = None
    overwrite: bool = False  # replace an existing output folder that is not this recipe's earlier output
    method: Literal["llm-surgeon", "sparsegpt", "wanda", "magnitude", "kobd", "lobd"] = "llm-surgeon"
    structure: str = "structured"
    target_size: float | None = None  # None: 0.7, or N/M for N:M structures
    shots: int = 1
    # calibration
    calibration: str = "builtin:stdlib-docs"
    calibration_split: str | None = None
    calibration_column: str = "text"
    nsamples: int = 32
    seqlen: int = 512
    calibration_seed: int = 0
    # evaluation
    eval_data: str | None = None
    eval_split: str | None = None
    eval_column: str = "text"
    eval_seqlen: int | None = None
    eval_max_windows: int | None = None
    eval_at: list[float] = Field(default_factory=list, description="target sizes to evaluate at (final always)")
    eval_batch_size: int = 1
    # zero-shot accuracy (lm-eval) of the dense model and at the evaluated shots; not part of the weights' hash
    zeroshot_tasks: list[str] = Field(default_factory=list, description="lm-eval task names ('a,b' works too); "
                                      "'standard' = the usual suite (needs the Hub)")
    task_dir: str | None = None  # folder of local task YAMLs (surgeon make-task)
    zeroshot_limit: int | None = None  # first N documents per task
    # method knobs (None = the paper's defaults for the structure)
    seed: int = 0
    damping_a: float = 0.01
    damping_g: float | None = None
    fisher: Literal["empirical", "sampled"] = "empirical"
    fisher_samples: int = 1
    max_correlate: int | None = None
    structured_update: Literal["sum", "sequential"] = "sum"
    # coupled structures: greedy order by cost (the paper's rule) or by cost per parameter (heads and kv groups are
    # 40-170x the size of an FFN unit)
    coupled_score: Literal["cost", "per_param"] = "cost"
    batch_size: int = 1
    compute_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # overflow in bf16/fp16 -> the shot reruns in fp32
    # dtype of the K-FAC factor matmuls (sums stay fp32): bf16 is ~4x faster on CPUs with AVX512-BF16 / on GPUs,
    # with ~1e-3 relative factor error (BENCHMARKS.md, A1 speed)
    gram_dtype: Literal["fp32", "bf16"] = "fp32"
    # dtype of the damped factors' Cholesky inverses: fp64 (the reference's) or fp32 (2.4x faster on a CPU)
    inverse_dtype: Literal["fp64", "fp32"] = "fp64"
    # SparseGPT / Wanda: dtype of their input statistics and mask / OBS math (forward passes stay in compute_dtype):
    # fp64 takes fp32 rounding out of SparseGPT's statistics and solver (P, 50%: 55.78-55.85 on every machine vs
    # 57.0-57.2 in fp32; A1: 0.9% higher than fp32, BENCHMARKS.md): a machine-independent, not a better, SparseGPT
    baseline_dtype: Literal["fp32", "fp64"] = "fp32"
    # curvature pass: recompute each decoder layer's activations in the backward pass instead of keeping them
    # (less memory for large batches or models; same factors, about one more forward pass of time)
    checkpoint_layers: bool = False
    # element updates (unstructured / N:M): solve this many layer shapes' systems at once, on CUDA each on a stream
    # of its own: the same weights, ~30% faster on an H200 at 7 (BENCHMARKS.md, "Element update"); more memory
    update_concurrent: int = Field(default=1, ge=1)
    device: str = "cpu"
    threads: int | None = None
    nproc: int = 1  # processes per shot (data-parallel curvature on one machine: one GPU each, or CPU/gloo)
    # mask-preserving fine-tuning of the surviving weights (surgeon_core.finetune; 0 steps = off)
    finetune_steps: int = 0  # after every shot (the paper's interleaved correction), on calibration windows
    final_finetune_steps: int = 0  # added after the last shot
    finetune_lr: float = 1e-5
    finetune_train: Literal["linears", "norms", "both"] = "linears"
    finetune_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    finetune_warmup: int = 0
    finetune_batch_size: int = 1
    # held-out calibration windows for fine-tuning: the last fraction of the windows is not trained on; their mean
    # loss is checked every ``finetune_validate_every`` steps (0: at the start and the end) and the best weights
    # are kept, so fine-tuning never leaves the model worse on them (0.0 = off: train on every window)
    finetune_holdout: float = 0.0
    finetune_validate_every: int = 0
    # first-order term: the loss gradient enters the costs and updates (llm-surgeon, kobd; empirical Fisher)
    first_order: bool = False
    first_order_scale: float = 1e-3  # 1 = the exact quadratic model: a Newton step far too long (docs/method.md)
    # tracking / registry
    # structured / coupled outputs: materialize in memory and log parameters, file sizes and CPU speed vs dense
    structure_report: bool = True
    structure_report_device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the report times the models
    # decode-step attention of a GPU report: sdpa, or flex (FlexAttention's decoding kernel; needs cuda or auto)
    structure_report_decode_attention: Literal["sdpa", "flex"] = "sdpa"
    register_model: bool = True
    model_name: str | None = None
    experiment: str = "llm-surgeon"
    promote_max_ppl_ratio: float = 1.15

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        return str(Structure.parse(v))

    @field_validator("target_size")
    @classmethod
    def _target(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"target_size must be in (0, 1] (fraction of weights kept), got {v}")
        return v

    @field_validator("finetune_holdout")
    @classmethod
    def _holdout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1) (fraction of calibration windows held out), got {v}")
        return v

    @field_validator("finetune_steps", "final_finetune_steps", "finetune_warmup", "finetune_validate_every")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("finetune_lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("shots", "nsamples", "batch_size", "fisher_samples", "eval_batch_size", "nproc", "finetune_batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("zeroshot_tasks", mode="before")
    @classmethod
    def _tasks(cls, v):
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("zeroshot_limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("seqlen", "eval_seqlen")
    @classmethod
    def _seqlen(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"seqlen must be at least 2, got {v}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "PruneConfig":
        st = Structure.parse(self.structure)
        if METHODS[self.method].layerwise and st.kind in ("structured", "coupled"):
            raise ValueError(f"method {self.method} does not support structured pruning")
        if st.kind == "nm" and self.target_size is not None and abs(self.target_size - st.n / st.m) > 1e-9:
            raise ValueError(f"{st} sparsity keeps exactly {st.n / st.m:g} of the weights; "
                             f"target_size {self.target_size} does not match")
        for s in self.eval_at:
            if not 0.0 < s <= 1.0:
                raise ValueError(f"eval_at sizes must be in (0, 1], got {s}")
        if self.damping_a < 0 or (self.damping_g is not None and self.damping_g < 0):
            raise ValueError("damping must be non-negative")
        if self.nproc > 1:
            if METHODS[self.method].layerwise or METHODS[self.method].curvature == "none":
                raise ValueError(f"nproc > 1 shares out the curvature pass; method {self.method} has none")
            if self.nsamples < self.nproc:
                raise ValueError(f"nproc {self.nproc} needs at least one calibration window per process "
                                 f"(nsamples is {self.nsamples})")
        if self.first_order and (METHODS[self.method].curvature != "kfac" or st.kind == "coupled"
                                 or self.fisher != "empirical"):
            raise ValueError("first_order needs method llm-surgeon or kobd, a structure other than coupled, and "
                             "fisher 'empirical'")
        if self.first_order_scale < 0:
            raise ValueError("first_order_scale must be non-negative")
        if self.structure_report_decode_attention == "flex" and self.structure_report_device == "cpu":
            raise ValueError("structure_report_decode_attention 'flex' is for a GPU report: set "
                             "structure_report_device to cuda or auto")
        return self

    @property
    def final_target(self) -> float:
        st = Structure.parse(self.structure)
        if st.kind == "nm":
            return st.n / st.m
        return 0.7 if self.target_size is None else self.target_size

    def config_hash(self) -> str:
        """Hash of the fields that determine the pruned weights (not output, tracking or evaluation)."""
        d = self.model_dump()
        payload = {k: d[k] for k in WEIGHT_FIELDS}
        payload["target_size"] = self.final_target
        if self.inverse_dtype != "fp64":  # added later: the default keeps earlier recipes' hashes (cached shots)
            payload["inverse_dtype"] = self.inverse_dtype
        if self.baseline_dtype != "fp32":
            payload["baseline_dtype"] = self.baseline_dtype
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def parse_overrides(items: list[str]) -> dict:
    """``["shots=4", "eval_at=[0.9,0.8]"]`` -> dict; values are parsed as YAML scalars/lists."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SurgeonError(f"override must look like key=value, got '{item}'")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def _friendly(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "recipe"
    if err.get("type") == "extra_forbidden":
        return f"unknown recipe key '{loc}'"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return f"invalid recipe value for '{loc}': {msg}" if loc != "recipe" else f"invalid recipe: {msg}"


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, **flags) -> PruneConfig:
    """Build a validated config: YAML recipe (optional) < ``key=value`` overrides < explicit flags (not None)."""
    data: dict = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise SurgeonError(f"recipe not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise SurgeonError(f"malformed recipe YAML {p}{where}: {getattr(exc, 'problem', exc)}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SurgeonError(f"recipe {p} must be a mapping of keys to values")
        data.update(loaded)
    data.update(parse_overrides(overrides or []))
    data.update({k: v for k, v in flags.items() if v is not None})
    if "model" not in data:
        raise SurgeonError("no model given (recipe key 'model' or --model)")
    try:
        return PruneConfig(**data)
    except ValidationError as exc:
        raise SurgeonError(_friendly(exc)) from exc
