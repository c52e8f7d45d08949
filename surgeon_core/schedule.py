"""The multi-shot plan (paper Algorithm 1, outer loop; §3.5, docs/method.md §1.6): which target size after which
shot, where to fine-tune and where to evaluate. Computed once here; the runner, the flow and the benchmarks iterate
it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Step", "linear_schedule", "plan"]


@dataclass(frozen=True)
class Step:
    """One step of a run: prune shot ``shot`` (1-based) of ``num_shots`` down to ``target_size``, then fine-tune
    ``finetune_steps`` mask-preserving steps (0: none), then evaluate if ``evaluate``."""

    shot: int
    num_shots: int
    target_size: float
    evaluate: bool = False
    finetune_steps: int = 0

    @property
    def last(self) -> bool:
        return self.shot == self.num_shots

    def to_dict(self) -> dict:
        return asdict(self)


def linear_schedule(target_size: float, num_shots: int) -> list[float]:
    """Target size after each shot: α_t = 1 − t(1−α)/T, t = 1..T (the paper's linear schedule)."""
    if not 0.0 < target_size <= 1.0:
        raise ValueError(f"target size must be in (0, 1], got {target_size}")
    if num_shots < 1:
        raise ValueError(f"number of shots must be at least 1, got {num_shots}")
    return [1.0 - t * (1.0 - target_size) / num_shots for t in range(1, num_shots + 1)]


def plan(target_size: float, shots: int, *, layerwise: bool = False, eval_at: tuple[float, ...] | list = (),
         finetune_steps: int = 0, final_finetune_steps: int = 0) -> list[Step]:
    """The run's steps. Layer-wise baselines (SparseGPT, Wanda, magnitude on elements) prune in one step whatever
    ``shots`` says; the others follow the linear schedule. A step is evaluated when it is the one nearest to a size
    in ``eval_at``, and the last always is. ``finetune_steps`` follow every shot, ``final_finetune_steps`` the last."""
    if eval_at and not all(0.0 < s <= 1.0 for s in eval_at):
        raise ValueError(f"eval_at sizes must be in (0, 1], got {list(eval_at)}")
    if finetune_steps < 0 or final_finetune_steps < 0:
        raise ValueError("fine-tuning step counts must be non-negative")
    targets = [target_size] if layerwise else linear_schedule(target_size, shots)
    n = len(targets)
    nearest = {min(range(n), key=lambda i: abs(targets[i] - s)) for s in eval_at} | {n - 1}
    return [Step(shot=i + 1, num_shots=n, target_size=t, evaluate=i in nearest,
                 finetune_steps=finetune_steps + (final_finetune_steps if i == n - 1 else 0))
            for i, t in enumerate(targets)]
