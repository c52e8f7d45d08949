"""surgeon_core: The LLM Surgeon (van der Ouderaa et al., ICLR 2024) in pure torch.

K-FAC curvature, OBS removal costs and correlated updates for unstructured, N:M and structured (rows/columns)
pruning, one global threshold per shot, a multi-shot driver, and the baselines (magnitude, Wanda, SparseGPT,
K-OBD, L-OBD). No transformers / datasets / prefect / mlflow imports and no file or network I/O.

Reading order: ``reference.py`` is one shot written plainly; ``shot.py`` is the same shot as phases over
``curvature.py``, ``subproblem.py`` (one linear's costs and updates), ``allocation.py`` (the global threshold),
``update.py`` (the batched OBS solves), ``linalg.py`` (damped solves) and ``placement.py`` (ranks and memory).
"""

__version__ = "0.1.1"

from .adapters import adapter_for, prunable_linears  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .schedule import Step, plan  # noqa: E402
from .methods import METHODS, PruneOptions, Structure  # noqa: E402
from .shot import ShotReport, prune_shot, run_step  # noqa: E402

__all__ = ["__version__", "METHODS", "Structure", "PruneOptions", "ShotReport", "Step", "plan", "prune_shot", "run_step",
           "perplexity", "adapter_for", "prunable_linears"]
