"""Golden masks: every method × structure it supports prunes the same weights as the recorded run.

``tests/data/golden_masks.json`` holds, per case, the sha256 of the boolean masks (weight == 0) of every prunable
linear after pruning a tiny random model; ``generated_by`` names the commit whose code produced them. A change that
moves any mask of any case fails here: refactors of ``surgeon_core`` must keep this file unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from surgeon_core.adapters import prunable_linears
from surgeon_core.methods import METHODS, PruneOptions, Structure
from tiny_models import prune, tiny_model, tiny_windows

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_masks.json"
STRUCTURES = ("unstructured", "2:4", "structured", "coupled")
TARGETS = {"unstructured": 0.55, "2:4": 0.5, "structured": 0.7, "coupled": 0.75}


def _cases() -> dict[str, dict]:
    """name -> case: every method × every structure it supports on llama, llm-surgeon on opt, a few options."""
    cases = {}
    for family, methods in (("llama", tuple(METHODS)), ("opt", ("llm-surgeon",))):
        for method in methods:
            for structure in STRUCTURES:
                if not METHODS[method].supports(Structure.parse(structure)):
                    continue
                cases[f"{family}/{method}/{structure}"] = dict(family=family, method=method, structure=structure,
                                                              options={})
    extra = {  # options that take other branches of the shot
        "llama/llm-surgeon/structured/sequential": ("structured", {"structured_update": "sequential"}),
        "llama/llm-surgeon/structured/first_order": ("structured", {"first_order": True}),
        "llama/llm-surgeon/unstructured/first_order": ("unstructured", {"first_order": True}),
        "llama/llm-surgeon/unstructured/max_correlate_0": ("unstructured", {"max_correlate": 0}),
        "llama/llm-surgeon/unstructured/inverse_fp32": ("unstructured", {"inverse_dtype": torch.float32}),
        "llama/llm-surgeon/structured/per_row": ("structured", {"max_correlate": 1}),
        "llama/kobd/structured/first_order": ("structured", {"first_order": True}),
        "llama/llm-surgeon/coupled/per_param": ("coupled", {"coupled_score": "per_param"}),
    }
    for name, (structure, options) in extra.items():
        family, method = name.split("/")[:2]
        cases[name] = dict(family=family, method=method, structure=structure, options=options)
    return cases


CASES = _cases()
# the element-wise OBS cases take seconds each on one CPU thread: marked heavy, left out of make test-fast
HEAVY = {"llama/llm-surgeon/unstructured", "llama/llm-surgeon/unstructured/max_correlate_0",
         "llama/llm-surgeon/unstructured/inverse_fp32", "llama/llm-surgeon/unstructured/first_order",
         "llama/llm-surgeon/2:4", "opt/llm-surgeon/unstructured", "opt/llm-surgeon/2:4"}


def masks_digest(model) -> str:
    """sha256 over every prunable linear's name, shape and boolean mask (weight == 0), in model order."""
    h = hashlib.sha256()
    for name, lin in prunable_linears(model).items():
        mask = (lin.weight.detach() == 0).cpu().contiguous()
        h.update(f"{name}:{tuple(mask.shape)}".encode())
        h.update(mask.numpy().tobytes())
    return h.hexdigest()


def run_case(case: dict):
    """Prune the case's tiny model (2 shots where the method is multi-shot) on one thread; returns the model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order whatever the machine
    try:
        model = tiny_model(case["family"], seed=1)
        options = PruneOptions(method=case["method"], structure=case["structure"], batch_size=2, **case["options"])
        prune(model, tiny_windows(4, 16, seed=2), options=options, target_size=TARGETS[case["structure"]],
              num_shots=1 if options.layerwise else 2)
    finally:
        torch.set_num_threads(threads)
    return model


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_file_covers_every_case():
    data = _golden()
    assert data["generated_by"] and set(data["masks"]) == set(CASES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in sorted(CASES)])
def test_masks_unchanged(name):
    expected = _golden()["masks"].get(name)
    if expected is None:
        pytest.fail(f"no golden mask for {name}: regenerate tests/data/golden_masks.json")
    model = run_case(CASES[name])
    for lin in prunable_linears(model).values():
        assert torch.isfinite(lin.weight).all()
    assert masks_digest(model) == expected
