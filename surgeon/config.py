"""One validated configuration (a "recipe") for a pruning run, in sections by concern.

    model: smollm2-135m
    method:      {name: llm-surgeon, structure: structured, target_size: 0.7, shots: 12, <method options>}
    calibration: {data: data/python-docs/python-docs.txt, nsamples: 32, seqlen: 512, seed: 0}
    eval:        {data: data/wikitext-2-raw/wiki.test.raw, seqlen: 512, at: [0.9, 0.8]}
    compute:     {device: cpu, dtype: fp32, batch_size: 1}
    finetune:    {steps: 0, final_steps: 0, lr: 1.0e-5}
    output:      {path: runs/pruned, register_model: true}

The method options are those of the method registry (``surgeon_core.methods``), which also validates them and
writes their help. Any field can be given as ``section.field=value``, as ``section_field=value`` or, where the name
is unique across sections (or names its usual one: ``seqlen``, ``batch_size`` and ``seed`` are calibration's, compute's
and method's), as ``field=value``; ``method: NAME``, ``calibration: DATA``, ``eval: DATA`` and ``output: PATH`` are
short for their ``name``/``data``/``path`` field. The config hash covers what changes the weights, derived from the fields."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from surgeon_core.methods import DTYPES, METHODS, OPTIONS, PruneOptions, Structure
from surgeon_core.schedule import Step, plan

from .errors import SurgeonError

__all__ = ["PruneConfig", "load_recipe", "build_config", "parse_overrides", "load_yaml", "read_yaml", "ALIASES",
           "SECTIONS", "GENERATED"]

NOT_WEIGHTS = {"weights": False}  # json_schema_extra of fields that do not change the pruned weights


def added_later(before: Any) -> dict:
    """json_schema_extra of a weight field added after recipes were hashed: at ``before`` (the behaviour from before
    the field existed) it is left out of the config hash, so earlier recipes, caches and outputs keep their keys."""
    return {"weights_before": before}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _positive(v: int) -> int:
    if v < 1:
        raise ValueError(f"must be at least 1, got {v}")
    return v


def _non_negative(v: int) -> int:
    if v < 0:
        raise ValueError(f"must be >= 0, got {v}")
    return v


def _option_field(opt) -> tuple:
    kinds = {bool: bool, int: int, float: float, str: str}
    typ = kinds.get(type(opt.default), float if opt.name.startswith("damping") else int)
    if opt.choices:
        typ = Literal[opt.choices]  # type: ignore[valid-type]
    return (typ | None, Field(default=None, description=opt.help))


_MethodOptions = create_model("_MethodOptions", __base__=_Section,
                              **{name: _option_field(opt) for name, opt in OPTIONS.items()})


class MethodSection(_MethodOptions):
    """What is removed and how. Method options left unset take the registry's default (per structure)."""

    name: str = Field(default="llm-surgeon", description=f"one of {', '.join(METHODS)}")
    structure: str = Field(default="structured", description="unstructured, structured, coupled or N:M (2:4)")
    target_size: float | None = Field(default=None, description="fraction of prunable weights kept (default 0.7; "
                                      "N/M for N:M)")
    shots: int = Field(default=1, description="shots of the linear schedule (layer-wise baselines take one)")
    seed: int = Field(default=0, description="seed of the sampled Fisher's labels and of fine-tuning")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose from {', '.join(METHODS)}")
        return v

    @field_validator("structure", mode="before")
    @classmethod
    def _structure(cls, v) -> str:
        return str(Structure.parse(str(v)))

    @field_validator("target_size")
    @classmethod
    def _target(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1] (fraction of weights kept), got {v}")
        return v

    _shots = field_validator("shots")(classmethod(lambda cls, v: _positive(v)))

    @model_validator(mode="after")
    def _registry(self) -> "MethodSection":
        spec, st = METHODS[self.name], Structure.parse(self.structure)
        if not spec.supports(st):
            raise ValueError(f"method {self.name} does not support {st} pruning (use unstructured or N:M)")
        if st.kind == "nm" and self.target_size is not None and self.target_size < st.n / st.m - 1e-9:
            raise ValueError(f"{st} sparsity keeps at least {st.n / st.m:g} of the weights; target_size "
                             f"{self.target_size} is below it")
        foreign = [k for k in OPTIONS if getattr(self, k) is not None and k not in spec.options]
        if foreign:
            raise ValueError(f"method {self.name} has no option {foreign[0]!r} (its options: "
                             f"{', '.join(spec.options) or 'none'})")
        for key in ("damping_a", "damping_g", "baseline_damping", "first_order_scale"):
            v = getattr(self, key)
            if v is not None and not v >= 0:
                raise ValueError(f"{key} must be a non-negative number, got {v}")
        for key in ("fisher_samples", "block_size"):
            if getattr(self, key) is not None:
                _positive(getattr(self, key))
        if self.max_correlate is not None:
            _non_negative(self.max_correlate)
        if self.first_order and (spec.curvature != "kfac" or st.kind == "coupled" or self.fisher == "sampled"):
            raise ValueError("first_order needs method llm-surgeon or kobd, a structure other than coupled, and the "
                             "empirical Fisher")
        return self

    @property
    def final_target(self) -> float:
        st = Structure.parse(self.structure)
        if self.target_size is not None:
            return self.target_size  # N:M above N/M: that fraction of the groups made N:M (a shot of a schedule)
        return st.n / st.m if st.kind == "nm" else 0.7

    def options(self) -> dict[str, Any]:
        """The method options that are set (the rest take the registry's defaults)."""
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) is not None}


class CalibrationSection(_Section):
    data: str = Field(default="builtin:stdlib-docs", description="text file, .npy token ids/windows, Hub dataset "
                      "or builtin: name")
    split: str | None = Field(default=None, description="split of a Hub dataset (default: train)")
    column: str = Field(default="text", description="text column of a Hub, JSON or Parquet dataset")
    nsamples: int = Field(default=32, description="calibration windows")
    seqlen: int = Field(default=512, description="tokens per calibration window")
    seed: int = Field(default=0, description="seed of the window draw")

    _n = field_validator("nsamples")(classmethod(lambda cls, v: _positive(v)))

    @field_validator("seqlen")
    @classmethod
    def _seqlen(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"seqlen must be at least 2, got {v}")
        return v


class EvalSection(_Section):
    data: str | None = Field(default=None, description="evaluation text or token ids (None: no perplexity)")
    split: str | None = Field(default=None, description="split of a Hub dataset (default: train)")
    column: str = Field(default="text", description="text column of a Hub, JSON or Parquet dataset")
    seqlen: int | None = Field(default=None, description="evaluation window (default: calibration.seqlen)")
    max_windows: int | None = Field(default=None, description="evaluate on the first N windows only (None: all)")
    at: list[float] = Field(default_factory=list, description="target sizes to evaluate at (the last always)")
    batch_size: int = Field(default=1, description="windows per evaluation forward pass (zero-shot tasks too)")
    zeroshot_tasks: list[str] = Field(default_factory=list, description="lm-eval task names ('a,b' works too)")
    task_dir: str | None = Field(default=None, description="folder of local lm-eval task YAMLs for zeroshot_tasks")
    zeroshot_limit: int | None = Field(default=None, description="examples per zero-shot task (None: all)")
    also: dict[str, str] = Field(default_factory=dict, description="more evaluation texts, name: data; their "
                                 "perplexity at the dense model and wherever data is evaluated (same seqlen and "
                                 "max_windows; surgeon bench and in-process runs)")

    @field_validator("also")
    @classmethod
    def _also(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(k))]
        if bad:
            raise ValueError(f"names of eval.also are letters, digits, '_', '.' and '-', got {bad[0]!r}")
        return v

    @field_validator("zeroshot_tasks", mode="before")
    @classmethod
    def _tasks(cls, v):
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @field_validator("at")
    @classmethod
    def _at(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"sizes must be in (0, 1], got {bad[0]}")
        return v

    @field_validator("seqlen")
    @classmethod
    def _seqlen(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"seqlen must be at least 2, got {v}")
        return v

    @field_validator("batch_size", "max_windows", "zeroshot_limit")
    @classmethod
    def _pos(cls, v: int | None) -> int | None:
        return v if v is None else _positive(v)


class ComputeSection(_Section):
    device: str = Field(default="cpu", description="torch device", json_schema_extra=NOT_WEIGHTS)
    dtype: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="compute dtype of the curvature "
                                                   "pass (an overflow reruns the shot in fp32)")
    gram_dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="dtype of the K-FAC factor matmuls "
                                                "(sums stay fp32)")
    inverse_dtype: Literal["fp64", "fp32"] = Field(default="fp64", description="dtype of the damped factors' "
                                                   "Cholesky inverses")
    solve_dtype: Literal["fp64", "fp32"] = Field(default="fp64", description="dtype of the element updates' "
                                                 "Cholesky factorizations (fp32: refined to float64 accuracy)",
                                                 json_schema_extra=added_later("fp64"))
    model_dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="dtype the model's weights are held in "
                                                 "while pruning (the solves stay fp32/fp64)")
    batch_size: int = Field(default=1, description="windows per forward/backward pass")
    threads: int | None = Field(default=None, description="torch CPU threads (default: the physical cores this "
                                 "process may use)", json_schema_extra=NOT_WEIGHTS)
    nproc: int = Field(default=1, description="processes per shot (data-parallel curvature)",
                       json_schema_extra=NOT_WEIGHTS)
    checkpoint_layers: bool = Field(default=False, description="recompute layer activations in the backward pass",
                                    json_schema_extra=NOT_WEIGHTS)
    factor_passes: int = Field(default=1, description="curvature passes, one per block of decoder layers: one "
                               "block's fp32 factor sums alive at a time", json_schema_extra=NOT_WEIGHTS)
    shard_factors: bool = Field(default=False, description="nproc > 1: each K-FAC factor is kept only by the "
                                "process that solves its layer", json_schema_extra=NOT_WEIGHTS)
    shard_weights: bool = Field(default=False, description="nproc > 1: the model's decoder weights are sharded over "
                                "the processes of a shot and of the evaluation (FSDP2), each reading and holding only "
                                "its slices", json_schema_extra=NOT_WEIGHTS)
    factor_storage: Literal["fp32", "packed", "bf16"] = Field(
        default="fp32", description="how the finished K-FAC factors are kept (their sums stay fp32): fp32 matrices, "
        "packed (fp32 upper halves: half the memory, exact) or bf16 (half the memory, rounded)",
        json_schema_extra=added_later("fp32"))
    update_concurrent: int = Field(default=1, description="element updates: layer shapes solved at once",
                                   json_schema_extra=NOT_WEIGHTS)
    update_batch_layers: int = Field(default=0, description="element updates: same-shaped layers solved as one "
                                     "batch (0: all on a GPU, one on a CPU)", json_schema_extra=NOT_WEIGHTS)

    @field_validator("batch_size", "nproc", "update_concurrent", "factor_passes")
    @classmethod
    def _pos(cls, v: int) -> int:
        return _positive(v)

    _ubl = field_validator("update_batch_layers")(classmethod(lambda cls, v: _non_negative(v)))

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        return v if v is None else _positive(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        kind = v.split(":", 1)[0]
        if kind not in ("cpu", "cuda", "mps", "xpu") or (":" in v and not v.split(":", 1)[1].isdigit()):
            raise ValueError(f"unknown device {v!r}: use cpu, cuda or cuda:N")
        return v


GENERATED = "generated"  # finetune.data: windows sampled from the dense model itself


class FinetuneSection(_Section):
    steps: int = Field(default=0, description="mask-preserving steps after every shot (0: off)")
    final_steps: int = Field(default=0, description="steps added after the last shot")
    lr: float = Field(default=1e-5, description="AdamW learning rate after warmup")
    train: Literal["linears", "norms", "both"] = Field(default="linears", description="what is trained: the "
                                                       "prunable linears (weights, biases), the norms, or both")
    schedule: Literal["constant", "cosine", "linear"] = Field(default="cosine", description="learning rate after "
                                                              "warmup, per fine-tuning run: constant, or cosine or "
                                                              "linear decay to 0")
    warmup: int = Field(default=0, description="linear warmup steps at the start of every fine-tuning run")
    batch_size: int = Field(default=1, description="training windows per step")
    data: str | None = Field(default=None, description="text to fine-tune and validate on, cut into "
                             "non-overlapping windows of calibration.seqlen tokens; 'generated': windows sampled from "
                             "the dense model itself (None: the calibration windows)",
                             json_schema_extra=added_later(None))
    windows: int | None = Field(default=None, description="with data: its first N windows only (None: all the text "
                                "holds; generated: calibration.nsamples)", json_schema_extra=added_later(None))
    holdout: float = Field(default=0.1, description="fraction of the fine-tuning windows held out for validation "
                           "(sharing no tokens with the training windows); the best weights on them are kept, the "
                           "pre-fine-tuning ones if none is better (0: no validation)")
    holdout_min: int = Field(default=2, description="with holdout: at least this many validation windows")
    validate_every: int = Field(default=0, description="with holdout: validate every N steps (0: every tenth of "
                                "the run's steps)")
    patience: int = Field(default=3, description="with holdout: stop after N validations without a new best "
                          "(0: run every step)")
    loss: Literal["ce", "kd", "mix"] = Field(default="mix", description="objective: next-token loss (ce), KL to "
                                             "the dense model's next-token distribution (kd), or both (mix)")
    kd_weight: float = Field(default=0.5, description="loss mix: weight of the KL term, (1 - w) on the "
                             "next-token loss")
    kd_topk: int = Field(default=64, description="kd/mix: teacher tokens kept per position (the rest of the "
                         "vocabulary is one bucket)")

    _nn = field_validator("steps", "final_steps", "warmup", "validate_every", "patience")(
        classmethod(lambda cls, v: _non_negative(v)))
    _bs = field_validator("batch_size", "holdout_min", "kd_topk")(classmethod(lambda cls, v: _positive(v)))

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: int | None) -> int | None:
        return v if v is None else _positive(v)

    @field_validator("kd_weight")
    @classmethod
    def _kd_weight(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("holdout")
    @classmethod
    def _holdout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1) (fraction of calibration windows held out), got {v}")
        return v

    @property
    def active(self) -> bool:
        return bool(self.steps or self.final_steps)


class OutputSection(_Section):
    path: str | None = Field(default=None, description="output model folder")
    overwrite: bool = Field(default=False, description="replace an output that is not this recipe's own")
    materialize: bool | None = Field(default=None, description="also write the smaller model (structured / "
                                     "coupled; default: on for coupled, off otherwise)")
    register_model: bool = Field(default=True, description="register the pruned model in MLflow")
    model_name: str | None = Field(default=None, description="registered model name (default: the source model's "
                                   "name)")
    experiment: str = Field(default="llm-surgeon", description="MLflow experiment of the run")
    promote_max_ppl_ratio: float = Field(default=1.15, description="promotion gate: pruned ppl at most this times "
                                         "the dense ppl")
    structure_report: bool = Field(default=True, description="structured / coupled: sizes and speed vs dense")
    report_device: Literal["cpu", "cuda", "auto"] = Field(default="cpu", description="device of the structure "
                                                          "report's speed runs (auto: cuda when there is a GPU)")
    report_decode_attention: Literal["sdpa", "flex"] = Field(default="sdpa", description="attention of the "
                                                             "structure report's decode steps (flex: CUDA only)")

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c in v for c in "/:")):
            raise ValueError(f"a registered model name must be non-empty, without '/' or ':', got {v!r}")
        return v

    @field_validator("promote_max_ppl_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 < v < float("inf"):
            raise ValueError(f"must be a positive finite number, got {v}")
        return v


SECTIONS: dict[str, type[_Section]] = {"method": MethodSection, "calibration": CalibrationSection,
                                       "eval": EvalSection, "compute": ComputeSection, "finetune": FinetuneSection,
                                       "output": OutputSection}
WEIGHT_SECTIONS = ("method", "calibration", "compute", "finetune")


# a bare name shared by several sections means the one people mean most often
PRIMARY = {"seqlen": "calibration", "batch_size": "compute", "seed": "method"}
NAMED = {"final_finetune_steps": ("finetune", "final_steps"), "structure_report_device": ("output", "report_device"),
         "structure_report_decode_attention": ("output", "report_decode_attention"),
         "compute_dtype": ("compute", "dtype")}


def _aliases() -> dict[str, tuple[str, str] | list[str]]:
    """Flat names -> (section, field): ``section.field``, ``section_field`` and unique bare ``field``; a bare name
    shared by several sections maps to the list of its qualified names (ambiguous)."""
    out: dict[str, Any] = {}
    bare: dict[str, list[tuple[str, str]]] = {}
    for sec, cls in SECTIONS.items():
        for f in cls.model_fields:
            out[f"{sec}.{f}"] = out[f"{sec}_{f}"] = (sec, f)
            bare.setdefault(f, []).append((sec, f))
    for f, where in bare.items():
        if f in out:
            continue
        if f in PRIMARY:
            out[f] = (PRIMARY[f], f)
        else:
            out[f] = where[0] if len(where) == 1 else [f"{s}.{n}" for s, n in where]
    out.update(NAMED)
    return out


ALIASES = _aliases()
# `method: wanda` = `method: {name: wanda}`
SHORTHAND = {"method": "name", "calibration": "data", "eval": "data", "output": "path"}


class PruneConfig(BaseModel):
    """A pruning recipe. ``method.target_size`` is the fraction of prunable linear weights kept (0.7 = 70% size)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="local HF folder, .gguf file, Hub id, random:<arch>, or a fetchable name")
    method: MethodSection = Field(default_factory=MethodSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _cross(self) -> "PruneConfig":
        spec = METHODS[self.method.name]
        if self.compute.nproc > 1:
            if spec.layerwise or spec.curvature == "none":
                raise ValueError(f"nproc > 1 shares out the curvature pass; method {self.method.name} has none")
            if self.calibration.nsamples < self.compute.nproc:
                raise ValueError(f"nproc {self.compute.nproc} needs at least one calibration window per process "
                                 f"(nsamples is {self.calibration.nsamples})")
        for key, what in (("shard_factors", "the factors"), ("shard_weights", "the weights")):
            if not getattr(self.compute, key):
                continue
            if self.compute.nproc < 2:
                raise ValueError(f"compute.{key} spreads {what} over the processes of a shot: it needs "
                                 "compute.nproc of 2 or more")
            if self.method.structure == "coupled":
                raise ValueError(f"compute.{key} needs per-layer solves: coupled structures are solved by one "
                                 "process")
        f = self.finetune
        if f.windows is not None and f.data is None:
            raise ValueError("finetune.windows limits the windows of finetune.data: set finetune.data too")
        n_windows = (f.windows or self.calibration.nsamples) if f.data == GENERATED else self.calibration.nsamples
        if f.active and f.holdout > 0 and f.data in (None, GENERATED) and n_windows <= f.holdout_min:
            raise ValueError(f"fine-tuning with validation needs more than finetune.holdout_min = {f.holdout_min} "
                             f"windows, it has {n_windows}; set finetune.holdout=0 to fine-tune without validation")
        if self.eval.also and not self.eval.data:
            raise ValueError("eval.also needs eval.data (the texts are evaluated where eval.data is)")
        if self.output.materialize is None:  # coupled pruning removes whole units: the smaller model is its point
            self.output.materialize = self.method.structure == "coupled"
        if self.output.report_decode_attention == "flex" and self.output.report_device == "cpu":
            raise ValueError("output.report_decode_attention 'flex' is for a GPU report: set output.report_device "
                             "to cuda or auto")
        return self

    # ------------------------------------------------------------------ derived
    @property
    def final_target(self) -> float:
        return self.method.final_target

    def options(self) -> PruneOptions:
        """The core's options for a step: the method's (registry defaults where unset) and the compute settings."""
        opts = self.method.options()
        if "baseline_dtype" in opts:
            opts["baseline_dtype"] = DTYPES[opts["baseline_dtype"]]
        c = self.compute
        return PruneOptions(method=self.method.name, structure=self.method.structure, seed=self.method.seed,
                            batch_size=c.batch_size, device=c.device, checkpoint_layers=c.checkpoint_layers,
                            autocast_dtype=None if c.dtype == "fp32" else DTYPES[c.dtype],
                            gram_dtype=None if c.gram_dtype == "fp32" else DTYPES[c.gram_dtype],
                            inverse_dtype=DTYPES[c.inverse_dtype], solve_dtype=DTYPES[c.solve_dtype],
                            update_concurrent_batches=c.update_concurrent,
                            update_batch_layers=c.update_batch_layers, factor_passes=c.factor_passes,
                            shard_factors=c.shard_factors,
                            factor_storage=c.factor_storage,
                            **opts)

    def plan(self) -> list[Step]:
        """The run's steps (surgeon_core.schedule.plan): targets, fine-tuning and evaluation points."""
        return plan(self.final_target, self.method.shots, layerwise=self.options().layerwise,
                    eval_at=self.eval.at if self.eval.data else (), finetune_steps=self.finetune.steps,
                    final_finetune_steps=self.finetune.final_steps)

    def weight_payload(self) -> dict:
        """The fields that determine the pruned weights: the model and every field of the weight sections not
        marked otherwise; fine-tuning only when it runs."""
        payload: dict[str, Any] = {"model": self.model}
        for sec in WEIGHT_SECTIONS:
            section = getattr(self, sec)
            if sec == "finetune" and not section.active:
                continue
            fields = type(section).model_fields
            payload[sec] = {}
            for k, v in section.model_dump().items():
                extra = fields[k].json_schema_extra or {}
                if extra.get("weights", True) and not ("weights_before" in extra and v == extra["weights_before"]):
                    payload[sec][k] = v
        m = self.method
        payload["method"] = {"name": m.name, "structure": m.structure, "target_size": self.final_target,
                             "shots": m.shots, "seed": m.seed, **m.options()}
        return payload

    def config_hash(self) -> str:
        """Hash of the fields that determine the pruned weights (not output, tracking, evaluation or placement)."""
        blob = json.dumps(self.weight_payload(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """``section.field -> value`` (MLflow params, tables)."""
        out: dict[str, Any] = {"model": self.model}
        for sec in SECTIONS:
            for k, v in getattr(self, sec).model_dump().items():
                out[f"{sec}.{k}"] = v
        return out

    def recipe(self) -> dict:
        """The config as a recipe mapping: sections in order, the method's unset options left out."""
        d = self.model_dump()
        m = self.method
        d["method"] = {"name": m.name, "structure": m.structure, "target_size": m.target_size, "shots": m.shots,
                       "seed": m.seed, **m.options()}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.recipe(), sort_keys=False)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers, so ``structure: 2:4`` stays the string "2:4" (not 124)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if not (tag.endswith((":int", ":float")) and ":" in rx.pattern[1:])]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_INT = r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
_FLOAT = r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+)$"
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_INT), list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))


def load_yaml(text: str):
    """Safe YAML (no Python tags) without base-60 numbers."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


def parse_overrides(items: list[str]) -> dict:
    """``["shots=4", "eval.at=[0.9,0.8]"]`` -> dict of flat names; values are parsed as YAML scalars/lists."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SurgeonError(f"override must look like key=value, got '{item}'")
        try:
            out[key.strip().replace("-", "_")] = load_yaml(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise SurgeonError(f"override '{item}': the value is not valid YAML ({exc.__class__.__name__})") from exc
    return out


def nest(flat: dict) -> dict:
    """Flat and sectioned keys -> the sectioned form (later keys win). Raises SurgeonError for unknown or
    ambiguous names."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key == "model" or (key in SECTIONS and isinstance(value, dict)):
            if key == "model":
                out["model"] = value
            else:
                out.setdefault(key, {}).update(value)
            continue
        if key in SHORTHAND and not isinstance(value, dict):
            out.setdefault(key, {})[SHORTHAND[key]] = value
            continue
        where = ALIASES.get(key)
        if where is None:
            raise SurgeonError(f"unknown recipe key '{key}'")
        if isinstance(where, list):
            raise SurgeonError(f"recipe key '{key}' is ambiguous: say {' or '.join(where)}")
        sec, field = where
        out.setdefault(sec, {})[field] = value
    return out


def _friendly(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "recipe"
    if err.get("type") == "extra_forbidden":
        return f"unknown recipe key '{loc}'"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return f"invalid recipe value for '{loc}': {msg}" if loc != "recipe" else f"invalid recipe: {msg}"


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, with one-line errors (safe loader: no Python tags)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SurgeonError(f"recipe not found: {p}")
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SurgeonError(f"malformed recipe YAML {p}{where}: {getattr(exc, 'problem', exc)}") from exc
    except UnicodeDecodeError as exc:
        raise SurgeonError(f"recipe {p} is not UTF-8 text") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SurgeonError(f"recipe {p} must be a mapping of keys to values")
    return loaded


def merge(*layers: dict) -> dict:
    """Sectioned dicts merged left to right (sections merge field by field)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in nest(layer).items():
            if isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
    return out


def build_config(data: dict) -> PruneConfig:
    """Validate a (flat or sectioned) dict into a config, with one-line errors."""
    data = merge(data)
    if "model" not in data:
        raise SurgeonError("no model given (recipe key 'model' or --model)")
    try:
        return PruneConfig(**data)
    except ValidationError as exc:
        raise SurgeonError(_friendly(exc)) from exc


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, *, extra: dict | None = None,
                **flags) -> PruneConfig:
    """A validated config: YAML recipe (optional) < ``extra`` < ``key=value`` overrides < explicit flags (not
    None). Flags use the flat names (``target_size``, ``eval_data``, ``output_path`` ...)."""
    layers = [read_yaml(path) if path is not None else {}]
    layers.append({k: v for k, v in (extra or {}).items()})
    layers.append(parse_overrides(overrides or []))
    layers.append({k: v for k, v in flags.items() if v is not None})
    return build_config(merge(*layers))
