"""The readable reference shot (surgeon_core.reference) and the fast path (surgeon_core.shot.prune_shot) prune the
same weights: identical masks, weights equal up to the solvers' rounding."""

from __future__ import annotations

import pytest
import torch

from surgeon_core.adapters import prunable_linears
from surgeon_core.methods import PruneOptions
from surgeon_core.reference import prune_shot_reference
from surgeon_core.shot import prune_shot
from tiny_models import tiny_model, tiny_windows

pytestmark = pytest.mark.integration

HEAVY = pytest.mark.heavy  # seconds each on one CPU thread: left out of make test-fast

# (family, structure, target size, options)
CASES = [
    pytest.param("llama", "unstructured", 0.6, {}, marks=HEAVY),
    pytest.param("llama", "unstructured", 0.6, {"max_correlate": 0}, marks=HEAVY),
    ("opt", "unstructured", 0.6, {"max_correlate": 150}),
    pytest.param("llama", "2:4", 0.6, {}, marks=HEAVY),
    pytest.param("opt", "2:4", 0.5, {}, marks=HEAVY),
    ("llama", "4:8", 0.55, {"max_correlate": 300}),
    ("llama", "structured", 0.7, {}),
    ("opt", "structured", 0.7, {}),
    ("llama", "structured", 0.7, {"structured_update": "sequential"}),
]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: torch.cat([l.weight.detach().flatten()] + ([l.bias.detach()] if l.bias is not None else []))
            for n, l in prunable_linears(model).items()}


@pytest.mark.parametrize("family,structure,target,extra", CASES)
def test_fast_path_equals_reference(family, structure, target, extra):
    """One shot from a model already pruned once (so dead rows/columns and earlier zeros are exercised).

    Tolerance: the reference solves its OBS systems with an LU in float64 and applies ΔW in float64, the fast path
    with Cholesky factors and fp32 products (batched, chunked): both agree to fp32 rounding of the weights, relative
    1e-4 of their scale; the masks do not depend on the solver and are compared exactly."""
    options = PruneOptions(structure=structure, batch_size=2, **extra)
    windows = tiny_windows(4, 16, seed=3)
    start = tiny_model(family, seed=4)
    prune_shot(start, windows, options=options, target_size=(1 + target) / 2, shot=1, num_shots=2)
    fast, ref = tiny_model(family, seed=4), tiny_model(family, seed=4)
    fast.load_state_dict(start.state_dict())
    ref.load_state_dict(start.state_dict())
    report = prune_shot(fast, windows, options=options, target_size=target, shot=2, num_shots=2)
    estimated = prune_shot_reference(ref, windows, options, target, shot=2)
    for (name, w_fast), w_ref in zip(_weights(fast).items(), _weights(ref).values()):
        assert torch.equal(w_fast == 0, w_ref == 0), name
        scale = float(w_ref.abs().max())
        torch.testing.assert_close(w_fast, w_ref, rtol=1e-4, atol=1e-4 * scale, msg=name)
    assert estimated == pytest.approx(report.estimated_loss, rel=1e-6)


def test_reference_refuses_what_it_does_not_cover():
    model, windows = tiny_model("llama"), tiny_windows(2, 16)
    for options in (PruneOptions(method="kobd"), PruneOptions(structure="coupled"),
                    PruneOptions(first_order=True), PruneOptions(structure="structured", max_correlate=1)):
        with pytest.raises(ValueError):
            prune_shot_reference(model, windows, options, 0.8)
