"""What can be pruned and how: structures, the method registry (each method's curvature, costs, update and the
options it reads) and :class:`PruneOptions`, everything a step needs besides the model and the data.

The registry is the one list of methods: the configuration validates against it and the CLI prints its help."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .coupled import SCORES as COUPLED_SCORES

__all__ = ["DTYPES", "Structure", "Option", "OPTIONS", "MethodSpec", "METHODS", "PruneOptions"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp64": torch.float64}


@dataclass(frozen=True)
class Option:
    """A method option: its default (None: chosen per structure, see :class:`PruneOptions`), accepted values and a
    one-line help text."""

    name: str
    default: object
    help: str
    choices: tuple = ()


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("damping_a", 0.01, "damping of the input factor A, a fraction of its mean diagonal"),
    Option("damping_g", None, "damping of the output factor G (default 0.01 structured, 0.1 unstructured / N:M)"),
    Option("fisher", "empirical", "labels of the Fisher: the data's (empirical) or drawn from the model (sampled)",
           ("empirical", "sampled")),
    Option("fisher_samples", 1, "labels drawn per token for the sampled Fisher"),
    Option("max_correlate", None, "removed weights per row updated jointly (0: all; default 0 structured, 2000 "
           "unstructured / N:M)"),
    Option("structured_update", "sum", "rows and columns updated from the same W and summed, or rows first",
           ("sum", "sequential")),
    Option("coupled_score", "cost", "coupled structures: greedy order by cost or by cost per parameter",
           ("cost", "per_param")),
    Option("first_order", False, "the mean loss gradient enters the costs and updates (empirical Fisher)"),
    Option("first_order_scale", 1e-3, "scale of the gradient in the first-order term (1: the exact quadratic model)"),
    Option("block_size", 128, "SparseGPT: columns per lazy-update block"),
    Option("baseline_damping", 0.01, "SparseGPT: damping of the input Hessian, a fraction of its mean diagonal"),
    Option("true_sequential", False, "layer-wise baselines: calibrate each input group after pruning the earlier "
           "ones"),
    Option("baseline_dtype", None, "layer-wise baselines: dtype of their input statistics and solver (fp32 or fp64; "
           "default: the model's)", ("fp32", "fp64")),
)}


@dataclass(frozen=True)
class MethodSpec:
    """How a method prunes. ``layerwise``: a baseline that prunes every layer to the same sparsity in one pass
    (surgeon_core.baselines) on the structures it supports; the others take global multi-shot steps."""

    curvature: str  # "kfac" | "activations" | "none"
    cost_kind: str  # costs.CURVATURE_KINDS
    update: bool
    layerwise: bool = False
    options: tuple[str, ...] = ()
    help: str = ""

    def supports(self, structure: "Structure") -> bool:
        return not (self.layerwise and structure.kind in ("structured", "coupled"))


_KFAC = ("damping_a", "damping_g", "fisher", "fisher_samples", "max_correlate", "structured_update", "coupled_score",
         "first_order", "first_order_scale")
METHODS: dict[str, MethodSpec] = {
    "llm-surgeon": MethodSpec("kfac", "obs", True, options=_KFAC,
                              help="K-FAC costs, one global threshold, correlated OBS updates (the paper)"),
    "kobd": MethodSpec("kfac", "kfac-diag", False,
                       options=("fisher", "fisher_samples", "coupled_score", "first_order", "first_order_scale"),
                       help="K-FAC diagonal costs, no update (K-OBD)"),
    "lobd": MethodSpec("activations", "activations", False, options=("coupled_score",),
                       help="input-activation diagonal costs, no update (L-OBD)"),
    "magnitude": MethodSpec("none", "identity", False, options=("coupled_score",),
                            help="smallest weights first (per layer on elements, global on rows/columns)"),
    "sparsegpt": MethodSpec("none", "identity", True, layerwise=True,
                            options=("block_size", "baseline_damping", "true_sequential", "baseline_dtype"),
                            help="SparseGPT: per-layer OBS with a lazy-update Cholesky solver"),
    "wanda": MethodSpec("none", "identity", False, layerwise=True, options=("true_sequential", "baseline_dtype"),
                        help="Wanda: |W| times input norms, per output row"),
}


@dataclass(frozen=True)
class Structure:
    """What is removed: ``unstructured`` elements, ``nm`` (n nonzeros in every m inputs), ``structured`` (rows and
    columns of each linear independently) or ``coupled`` (FFN units, heads, kv groups: surgeon_core.coupled)."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Structure":
        text = text.strip().lower()
        if text in ("unstructured", "element", "elements"):
            return cls("unstructured")
        if text in ("structured", "rows-columns", "row-column"):
            return cls("structured")
        if text in ("coupled", "units"):
            return cls("coupled")
        if ":" in text:
            a, _, b = text.partition(":")
            if a.isdigit() and b.isdigit() and 0 < int(a) < int(b):
                return cls("nm", int(a), int(b))
        raise ValueError(f"unknown structure {text!r}: use 'unstructured', 'structured', 'coupled' "
                         "or 'N:M' such as '2:4'")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


@dataclass
class PruneOptions:
    """Everything a shot needs besides the model and data. Defaults follow the paper's scripts."""

    method: str = "llm-surgeon"
    structure: str = "structured"
    damping_a: float = 0.01
    damping_g: float | None = None  # None: 0.01 structured, 0.1 unstructured / N:M (the paper's scripts)
    fisher: str = "empirical"
    fisher_samples: int = 1
    max_correlate: int | None = None  # None: 0 (all) structured, 2000 unstructured / N:M
    batch_size: int = 1
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: bf16 compute, fp32 factors
    gram_dtype: torch.dtype | None = None  # dtype of the factor matmuls (None: fp32); sums stay fp32
    # dtype of the damped factors' Cholesky inverses: float64 (the reference's precision) or float32 (faster); the
    # inverses are stored in fp32 either way
    inverse_dtype: torch.dtype = torch.float64
    # dtype of the element updates' Cholesky factorizations: float32 adds iterative refinement (float64 accuracy)
    solve_dtype: torch.dtype = torch.float64
    device: str | None = None
    factor_device: str | None = None  # where K-FAC factors live (default: device); "spread": over all visible GPUs
    seed: int = 0
    # "sum": row and column updates from the same W, summed (the reference's form);
    # "sequential": rows, then the columns of the row-updated W
    structured_update: str = "sum"
    update_batch_layers: int = 0  # same-shaped layers whose element updates are batched (0: all on GPU, 1 on CPU)
    # element updates: this many of those batches (e.g. one per layer shape) are solved at once, on CUDA each on a
    # stream of its own (same results; their working memory is alive together)
    update_concurrent_batches: int = 1
    checkpoint_layers: bool = False  # curvature pass: recompute decoder-layer activations in backward (less memory)
    factor_passes: int = 1  # curvature passes, one per block of decoder layers: one block's fp32 sums alive at a time
    shard_factors: bool = False  # data-parallel: each factor is kept by the rank that solves its layer, not by all
    factor_storage: str = "fp32"  # finished factors: fp32, packed (fp32 upper parts, exact) or bf16 (rounded)
    # layer-wise baselines (SparseGPT / Wanda / magnitude on unstructured and N:M)
    block_size: int = 128
    baseline_damping: float = 0.01
    true_sequential: bool = False  # layer-wise baselines: calibrate each input group after pruning the earlier ones
    # layer-wise baselines: dtype of their input statistics and mask/OBS math (None: fp32; float64 for a float64 model)
    baseline_dtype: torch.dtype | None = None
    # coupled structures: (num_heads, num_kv_heads, head_dim) from the model config (None: read model.config)
    head_layout: tuple[int, int, int] | None = None
    # coupled structures: greedy order by "cost" (the paper's threshold on costs) or "per_param" (cost / parameters)
    coupled_score: str = "cost"
    # first-order term (docs/method.md §1.8): the mean loss gradient, collected in the curvature pass, enters the
    # costs and updates (LLM Surgeon: OBS at the Newton point W − s·G⁻¹∇W A⁻¹; K-OBD: −s·⟨∇W, W⟩ in the costs)
    first_order: bool = False
    first_order_scale: float = 1e-3  # s multiplies the gradient; at 1 (the exact model) gᵀF⁻¹g has no bound

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        self.structure_spec = Structure.parse(self.structure)
        spec = METHODS[self.method]
        if spec.layerwise and self.structure_spec.kind in ("structured", "coupled"):
            raise ValueError(f"method {self.method!r} does not support structured (rows/columns) pruning; "
                             "use llm-surgeon, kobd, lobd or magnitude")
        if self.damping_g is None:
            self.damping_g = 0.01 if self.structure_spec.kind in ("structured", "coupled") else 0.1
        if self.max_correlate is None:
            self.max_correlate = 0 if self.structure_spec.kind in ("structured", "coupled") else 2000
        if self.coupled_score not in COUPLED_SCORES:
            raise ValueError(f"coupled_score must be one of {', '.join(COUPLED_SCORES)}, not {self.coupled_score!r}")
        if self.update_concurrent_batches < 1:
            raise ValueError("update_concurrent_batches must be at least 1")
        if self.damping_a < 0 or self.damping_g < 0:
            raise ValueError("damping must be non-negative")
        if self.inverse_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"inverse_dtype must be torch.float64 or torch.float32, not {self.inverse_dtype}")
        if self.solve_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"solve_dtype must be torch.float64 or torch.float32, not {self.solve_dtype}")
        if self.baseline_dtype not in (None, torch.float64, torch.float32):
            raise ValueError(f"baseline_dtype must be None, torch.float64 or torch.float32, not {self.baseline_dtype}")
        if self.structured_update not in ("sequential", "sum"):
            raise ValueError("structured_update must be 'sequential' or 'sum'")
        if self.factor_passes < 1:
            raise ValueError("factor_passes must be at least 1")
        if self.factor_storage not in ("fp32", "packed", "bf16"):
            raise ValueError(f"factor_storage must be fp32, packed or bf16, not {self.factor_storage!r}")
        if self.shard_factors and self.structure_spec.kind == "coupled":
            raise ValueError("sharded factors need per-layer solves: coupled structures are solved on one rank")
        if self.fisher_samples < 1:
            raise ValueError("fisher_samples must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.first_order:
            if self.spec.curvature != "kfac":
                raise ValueError(f"the first-order term needs the K-FAC gradient pass: method {self.method!r} "
                                 "does not support it (use llm-surgeon or kobd)")
            if self.structure_spec.kind == "coupled":
                raise ValueError("the first-order term is not supported for coupled structures")
            if self.fisher != "empirical":
                raise ValueError("the first-order term needs the true-label gradient: use fisher='empirical'")
        if not self.first_order_scale >= 0:
            raise ValueError("first_order_scale must be non-negative")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def layerwise(self) -> bool:
        """SparseGPT/Wanda always, magnitude on unstructured/N:M: per-layer uniform sparsity (as their papers)."""
        return self.spec.layerwise or (self.method == "magnitude"
                                       and self.structure_spec.kind not in ("structured", "coupled"))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()}
        for key in ("autocast_dtype", "gram_dtype", "inverse_dtype", "solve_dtype", "baseline_dtype"):
            d[key] = str(d[key]).replace("torch.", "") if d[key] else None
        return d
