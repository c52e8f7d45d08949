"""The runner `surgeon prune` uses, on tiny Gemma 3 and Phi-3 folders: every structure runs through it, and a coupled
run's output materializes into a model that loads with from_pretrained and computes the zeroed model's function."""

from __future__ import annotations

import pytest
import torch

from surgeon.config import load_recipe
from surgeon.runner import run
from tiny_io import TEXT, save_tiny, tiny_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["gemma3", "phi3"])
def inputs(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(f"runner-{request.param}")
    text = root / "text.txt"
    text.write_text(TEXT)
    return {"root": root, "model": save_tiny(root / "tiny", request.param), "text": text}


@pytest.mark.heavy
@pytest.mark.parametrize("method,structure,size", [("llm-surgeon", "unstructured", 0.6), ("llm-surgeon", "2:4", 0.5),
                                                   ("llm-surgeon", "structured", 0.7), ("sparsegpt", "2:4", 0.5),
                                                   ("wanda", "unstructured", 0.5)])
def test_every_structure_through_the_runner(inputs, method, structure, size):
    shots = 1 if method != "llm-surgeon" else 2
    cfg = load_recipe(None, [], extra=tiny_recipe(inputs, method={"name": method, "structure": structure,
                                                                  "target_size": size, "shots": shots},
                                                  eval={"data": str(inputs["text"]), "max_windows": 4, "at": []}))
    result = run(cfg)
    assert abs(result["achieved_size"] - size) <= 0.01
    assert result["ppl"] > 0 and result["dense"]["ppl"] > 0


@pytest.mark.heavy
def test_coupled_run_materializes(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.materialized_export import materialize_dir

    out, small_dir = tmp_path / "pruned", tmp_path / "small"
    cfg = load_recipe(None, [f"output.path={out}"],
                      extra=tiny_recipe(inputs, method={"name": "llm-surgeon", "structure": "coupled",
                                                        "target_size": 0.6, "shots": 2}))
    result = run(cfg)
    assert abs(result["achieved_size"] - 0.6) <= 0.01
    assert materialize_dir(out, small_dir)["equivalence"]["same_function"]
    zeroed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    small = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float64).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in zeroed.parameters())
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = (small(input_ids=ids).logits - zeroed(input_ids=ids).logits).abs().max()
    assert d <= 1e-9
