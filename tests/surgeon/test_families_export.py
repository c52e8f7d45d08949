"""Materialization on every family: a coupled-pruned tiny model (Llama with and without GQA, Mistral with a sliding
window, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 with fused qkv / gate_up, OPT) is written smaller, loads with
from_pretrained (registered classes, and through surgeon's loader) and computes the zeroed model's function in
float64; a layer with no FFN unit left still loads (Gemma's post-FFN norm, Phi-3's fused gate_up)."""

import subprocess
import sys

import pytest
import torch

from tiny_io import tiny_tokenizer
from tiny_models import ALL_FAMILIES, coupled_pruned, empty_ffn, tiny_windows

pytestmark = pytest.mark.integration


def _logits64(model, x):
    model.double()
    try:
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits
    finally:
        model.float()


def _materialize(tmp_path, model):
    from surgeon.materialized_export import materialize_dir

    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    return materialize_dir(tmp_path / "src", tmp_path / "out")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_materialized_equals_zeroed_in_float64(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from surgeon.models import load_model

    model = coupled_pruned(family)
    x = tiny_windows(2, 16, seed=1)
    ref = _logits64(model, x)
    report = _materialize(tmp_path, model)
    assert report["equivalence"]["same_function"]
    after, before = report["parameters_after"], report["parameters_before"]
    assert after["total"] < before["total"]
    assert after["prunable"] == after["nonzero_prunable"] or family == "opt" or after["prunable"] < before["prunable"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert loaded.config.model_type == f"surgeon_pruned_{model.config.model_type}"
    assert sum(p.numel() for p in loaded.parameters()) == after["total"]
    assert (_logits64(loaded, x) - ref).abs().max() <= 1e-9
    via_registry, _, info = load_model(tmp_path / "out")  # the adapter table knows the per-layer-size type
    assert info.family == {"llama_mha": "llama", "mistral_swa": "llama", "qwen2": "llama", "qwen3": "llama",
                           "mistral": "llama", "gemma2": "gemma", "gemma3": "gemma"}.get(family, family)
    assert (_logits64(via_registry, x) - ref).abs().max() <= 1e-9


@pytest.mark.heavy
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_empty_ffn_and_fresh_process(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = empty_ffn(coupled_pruned(family))
    x = tiny_windows(2, 16, seed=1)
    ref = _logits64(model, x)
    report = _materialize(tmp_path, model)
    assert report["layers"][1]["intermediate_size"] == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits64(loaded, x) - ref).abs().max() <= 1e-9
    torch.save((x, ref), tmp_path / "io.pt")
    code = ("import torch; from transformers import AutoModelForCausalLM\n"  # the copied modelling file, no surgeon
            f"m = AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'out'}', trust_remote_code=True).eval()\n"
            f"x, ref = torch.load(r'{tmp_path / 'io.pt'}')\n"
            "m.double()\n"
            "with torch.no_grad(): d = (m(input_ids=x, use_cache=False).logits - ref).abs().max().item()\n"
            "assert d <= 1e-9, d\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
