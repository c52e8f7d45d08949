"""Progress of the layer-wise baselines: every method reports its own phases, each counted over the whole pass from 1
to its total (calibration batches to layer 0, batches through each layer with statistics hooks, linears pruned or
SparseGPT's column blocks solved, batches through each pruned layer, decoder layers), so a long pass is never
silent."""

from __future__ import annotations

import pytest

from surgeon_core.adapters import adapter_for, prunable_linears
from surgeon_core.baselines import PHASES, prune_model_layerwise
from tiny_models import tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def _calls(method: str, *, windows: int = 5, batch_size: int = 2, true_sequential: bool = False):
    model = tiny_model("llama")
    calls: list[tuple[str, int, int]] = []
    prune_model_layerwise(model, tiny_windows(windows, 8) if method != "magnitude" else None, method=method,
                          sparsity=0.5, batch_size=batch_size, true_sequential=true_sequential, block_size=32,
                          progress=lambda phase, done, total: calls.append((phase, done, total)))
    return model, calls


def _per_phase(calls):
    out: dict[str, list[tuple[int, int]]] = {}
    for phase, done, total in calls:
        out.setdefault(phase, []).append((done, total))
    return out


@pytest.mark.parametrize("method, true_sequential", [("wanda", False), ("sparsegpt", False), ("wanda", True),
                                                     ("magnitude", False)])
def test_each_phase_counts_from_one_to_its_total(method, true_sequential):
    model, calls = _calls(method, true_sequential=true_sequential)
    layers = model.config.num_hidden_layers
    batches = 3  # 5 windows in batches of 2 (layer inputs are counted in windows)
    adapter = adapter_for(model)
    passes = len(adapter.input_groups) + sum(  # true-sequential: one calibration pass per input group
        1 for name in adapter.linears if not any(name in g for g in adapter.input_groups)) if true_sequential else 1
    linears = prunable_linears(model, adapter).values()
    # SparseGPT counts its solves in blocks of 32 columns, the others count linears
    units = sum(-(-lin.in_features // 32) for lin in linears) if method == "sparsegpt" else len(linears)
    expected_totals = {"layers": layers, PHASES[method]["prune"]: units}
    if method != "magnitude":
        expected_totals.update({PHASES[method]["inputs"]: 5, PHASES[method]["outputs"]: layers * batches,
                                PHASES[method]["statistics"]: layers * batches * passes})
    per_phase = _per_phase(calls)
    assert set(per_phase) == set(expected_totals)
    for phase, ticks in per_phase.items():
        total = expected_totals[phase]
        assert [t for _, t in ticks] == [total] * len(ticks), phase
        dones = [d for d, _ in ticks]
        if phase == PHASES[method].get("inputs"):  # counted in windows, one call per batch
            assert dones == [2, 4, 5]
            continue
        assert dones == list(range(1, total + 1)), phase


def test_no_phase_of_llm_surgeon_is_reported_by_a_baseline():
    for method in ("wanda", "sparsegpt"):
        _, calls = _calls(method, windows=2, batch_size=1)
        phases = {p for p, _, _ in calls}
        assert not phases & {"curvature", "costs", "update"}
        assert all(p == "layers" or p.startswith(method) for p in phases)
