"""surgeon.materialized_export: a zeroed model folder written as a smaller per-layer-size model that loads through
transformers (also in a fresh process without surgeon, through auto_map), keeps its dtype, and checks itself (the
float64 logits of the smaller model equal the zeroed model's; a wrong kept list is refused, nothing written)."""

import subprocess
import sys

import pytest
import torch

from surgeon_core import adapter_for
from surgeon_core.materialize import find_kept
from tiny_models import coupled_pruned, empty_ffn, tiny_windows

pytestmark = pytest.mark.unit


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.heavy
def test_save_and_load_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.materialized_export import materialize_dir

    model = coupled_pruned("llama")
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    model.save_pretrained(tmp_path / "src")
    report = materialize_dir(tmp_path / "src", tmp_path / "out")
    assert report["parameters_after"]["total"] < report["parameters_before"]["total"]
    assert report["file_bytes"]["materialized"] < report["file_bytes"]["source"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()  # registered
    assert (_logits(loaded, x) - ref).abs().max() <= 1e-4
    # a fresh process without surgeon: the copied modelling file through auto_map
    torch.save((x, ref), tmp_path / "io.pt")
    code = ("import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'out'}', trust_remote_code=True).eval()\n"
            f"x, ref = torch.load(r'{tmp_path / 'io.pt'}')\n"
            "with torch.no_grad(): d = (m(x).logits - ref).abs().max().item()\n"
            "assert d <= 1e-4, d\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.heavy
def test_empty_ffn_saves_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.materialized_export import materialize_dir

    model = empty_ffn(coupled_pruned("llama"))
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    model.save_pretrained(tmp_path / "src")
    report = materialize_dir(tmp_path / "src", tmp_path / "out")
    assert report["layers"][1]["intermediate_size"] == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded.model.layers[1].mlp).__name__ == "_EmptyMLP"
    assert (_logits(loaded, x) - ref).abs().max() <= 1e-4
    torch.save((x, ref), tmp_path / "io.pt")
    code = ("import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'out'}', trust_remote_code=True).eval()\n"
            "assert type(m.model.layers[1].mlp).__name__ == '_EmptyMLP'\n"
            f"x, ref = torch.load(r'{tmp_path / 'io.pt'}')\n"
            "with torch.no_grad(): d = (m(x).logits - ref).abs().max().item()\n"
            "assert d <= 1e-4, d\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_materialize_checked_reports_the_logit_check(family):
    """Materialization checks itself: the float64 logits of the smaller model equal the zeroed model's."""
    from surgeon.materialized_export import materialize_checked

    model = coupled_pruned(family)
    _, report = materialize_checked(model)
    eq = report["equivalence"]
    assert eq["same_function"] and eq["float64_max_abs_diff"] <= 1e-9
    assert eq["fp32_max_abs_diff"] <= 1e-4 and eq["tokens"] == 2 * 64
    assert eq["max_abs_logit"] > 0 and 0 < eq["fp32_rounding_of_zeroed"] < 1e-3
    assert next(model.parameters()).dtype == torch.float32  # back from the float64 pass


def test_materialize_check_catches_a_dropped_nonzero_unit(tmp_path, monkeypatch):
    """A kept list that drops a unit that is not zero changes the function: refused, and nothing is written."""
    import surgeon_core.materialize as scm
    from surgeon.errors import SurgeonError
    from surgeon.materialized_export import materialize_checked, materialize_dir

    model = coupled_pruned("llama")
    ad = adapter_for(model)
    layout = ad.head_layout(model.config)
    bad = find_kept(model, ad, layout)
    bad[0] = dict(bad[0], ffn=bad[0]["ffn"][1:])  # drop a kept (nonzero) FFN unit of layer 0
    with pytest.raises(SurgeonError, match="does not compute the zeroed model's function"):
        materialize_checked(coupled_pruned("llama"), [dict(k) for k in bad], align=1)
    model.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(scm, "find_kept", lambda *a: [dict(k) for k in bad])
    with pytest.raises(SurgeonError, match="does not compute"):
        materialize_dir(tmp_path / "src", tmp_path / "out", align=1)
    assert not (tmp_path / "out").exists()
    _, report = materialize_checked(coupled_pruned("llama"), [dict(k) for k in bad], align=1, verify=False)
    assert "skipped" in report["equivalence"]


def test_materialize_keeps_the_source_dtype(tmp_path):
    """A bf16 zeroed model is written as a bf16 materialized model (smaller, same weights), not upcast to fp32."""
    from safetensors import safe_open

    from surgeon.materialized_export import materialize_dir

    model = coupled_pruned("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    report = materialize_dir(tmp_path / "src", tmp_path / "out", align=1)
    assert report["equivalence"]["same_function"]
    assert report["file_bytes"]["materialized"] < report["file_bytes"]["source"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert dtypes == {torch.bfloat16}
    kept = find_kept(model, adapter_for(model), adapter_for(model).head_layout(model.config))[0]["ffn"]
    assert torch.equal(w[:, : len(kept)], model.model.layers[0].mlp.down_proj.weight[:, kept])
