"""Progress of an LLM Surgeon shot: curvature (calibration windows), costs and updates (layers or linears) are
reported for every structure, the coupled one included, each phase counting from 1 to its total."""

from __future__ import annotations

import pytest

from surgeon_core import PruneOptions
from tiny_models import prune, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("structure", [pytest.param("unstructured", marks=pytest.mark.heavy),
                                       pytest.param("2:4", marks=pytest.mark.heavy), "structured", "coupled"])
def test_every_phase_of_a_shot_counts_to_its_total(structure):
    calls: list[tuple[str, int, int]] = []
    prune(tiny_model("llama"), tiny_windows(3, 8), options=PruneOptions(structure=structure),
          target_size=0.5 if structure == "2:4" else 0.7,
          progress=lambda phase, done, total: calls.append((phase, done, total)))
    phases: dict[str, list[tuple[int, int]]] = {}
    for phase, done, total in calls:
        phases.setdefault(phase, []).append((done, total))
    assert {"curvature", "costs", "update"} <= set(phases), structure
    for phase, ticks in phases.items():
        total = ticks[0][1]
        assert all(t == total for _, t in ticks), phase
        dones = [d for d, _ in ticks]
        assert dones == sorted(dones) and dones[-1] == total, (structure, phase, dones)
