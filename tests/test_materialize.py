"""Materialization: all-zero units dropped, per-layer smaller model, logits equal to the zeroed model's."""

import subprocess
import sys

import pytest
import torch

from surgeon_core import PruneOptions, adapter_for
from surgeon_core.adapters import get_submodule
from surgeon_core.materialize import count_parameters, find_kept, materialize_
from tiny_models import prune, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def _pruned(family, seed=0):
    model = tiny_model(family, seed=seed)
    prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled"), target_size=0.6)
    ad = adapter_for(model)
    nh, nkv, hd = ad.head_layout(model.config)
    with torch.no_grad():  # also drop heads 1 and 3 of layer 0 and (GQA) the whole second kv group of layer 1
        layers = get_submodule(model, ad.layers)
        for h in (1, 3):
            get_submodule(layers[0], ad.attention_out).weight[:, h * hd: (h + 1) * hd] = 0
        if nkv < nh:
            get_submodule(layers[1], ad.attention_out).weight[:, nh // 2 * hd:] = 0
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_materialized_logits_equal_zeroed(family):
    model = _pruned(family)
    ad = adapter_for(model)
    layout = ad.head_layout(model.config)
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    dense = count_parameters(model, ad)
    kept = find_kept(model, ad, layout)
    sizes = materialize_(model, ad, layout, kept)
    after = count_parameters(model, ad)
    assert (_logits(model, x) - ref).abs().max() <= 1e-4
    assert after["total"] < dense["total"] and after["prunable"] < dense["nonzero_prunable"]
    if family == "opt":  # no padding without GQA: nothing zero is left
        assert after["prunable"] == after["nonzero_prunable"]
    assert sizes[0]["num_heads"] < layout[0]
    if family == "llama":
        assert sizes[1]["num_kv_heads"] == layout[1] // 2


def test_save_and_load_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.materialized_export import materialize_dir

    model = _pruned("llama")
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


def test_cli_materialize_opt(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    import surgeon.materialized_export  # noqa: F401 - registers the per-layer-size classes
    from surgeon_cli.main import main

    model = _pruned("opt")
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    model.save_pretrained(tmp_path / "src")
    rc = main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr()
    assert "materialized" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["num_heads"] < 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits(loaded, x) - ref).abs().max() <= 1e-4
    rc = main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "out")])  # not empty: error
    assert rc == 2


def test_prune_materialize_step_and_eval(tmp_path, capsys):
    """The `prune --materialize` step on an exported folder; `surgeon eval` loads the result (same ppl)."""
    import json

    from surgeon.models import save_model
    from surgeon_cli.main import main
    from surgeon_cli.outputs import materialize_output as _materialize_output
    from tiny_io import TEXT, tiny_tokenizer

    save_model(_pruned("llama"), tiny_tokenizer(), tmp_path / "pruned")
    (tmp_path / "corpus.txt").write_text(TEXT)
    for _ in range(2):  # a re-run replaces the earlier materialized folder
        report = _materialize_output(str(tmp_path / "pruned"))
    assert report["output"] == str(tmp_path / "pruned-materialized")
    ppl = []
    for d in ("pruned", "pruned-materialized"):
        rc = main(["eval", "-m", str(tmp_path / d), "-d", str(tmp_path / "corpus.txt"), "-L", "32",
                   "--json", str(tmp_path / f"{d}.json")])
        assert rc == 0, capsys.readouterr().err
        ppl.append(json.loads((tmp_path / f"{d}.json").read_text())["ppl"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5)


@pytest.mark.parametrize("align", [4, 8])
def test_aligned_widths_keep_logits(align):
    """Padding FFN widths to a multiple of ``align`` keeps only all-zero extra units: logits unchanged."""
    model = _pruned("llama")
    ad = adapter_for(model)
    layout = ad.head_layout(model.config)
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    width = model.config.intermediate_size
    kept = find_kept(model, ad, layout)
    unaligned = [int(k["ffn"].numel()) for k in kept]
    sizes = materialize_(model, ad, layout, kept, align=align)
    for s, n in zip(sizes, unaligned):
        assert s["intermediate_size"] == min(width, -(-n // align) * align)
    assert (_logits(model, x) - ref).abs().max() <= 1e-4


def test_pad_kept_rejects_bad_align():
    from surgeon_core.materialize import pad_kept

    with pytest.raises(ValueError, match="align"):
        pad_kept([{"ffn": torch.tensor([0, 1])}], 8, 0)


def _empty_ffn(model, layer=1):
    """Zero every FFN unit of one decoder layer (its consumer columns), as a pruning run that removed them all."""
    ad = adapter_for(model)
    with torch.no_grad():
        get_submodule(get_submodule(model, ad.layers)[layer], ad.mlp_out).weight.zero_()
    return model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layer_without_ffn_units_is_materialized_empty(family):
    """No unit left: the layer keeps no placeholder unit (nor alignment padding); a Llama-like FFN becomes an
    EmptyMLP that does no work, OPT keeps zero-width fc1/fc2 (fc2 still adds its bias); logits unchanged."""
    from surgeon_core.materialize import EmptyMLP

    model = _empty_ffn(_pruned(family))
    ad = adapter_for(model)
    layout = ad.head_layout(model.config)
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    sizes = materialize_(model, ad, layout, align=8)
    assert sizes[1]["intermediate_size"] == 0 and sizes[0]["intermediate_size"] > 0
    layer = get_submodule(model, ad.layers)[1]
    assert get_submodule(layer, ad.mlp_out).weight.shape[1] == 0
    assert isinstance(get_submodule(layer, "mlp"), EmptyMLP) == (family == "llama")
    assert (_logits(model, x) - ref).abs().max() <= 1e-5


def test_empty_ffn_saves_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.materialized_export import materialize_dir

    model = _empty_ffn(_pruned("llama"))
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


@pytest.mark.parametrize("method,structure", [("llm-surgeon", "unstructured"), ("llm-surgeon", "2:4"),
                                              ("llm-surgeon", "structured"), ("wanda", "2:4"),
                                              ("sparsegpt", "unstructured"), ("magnitude", "unstructured")])
def test_materialized_model_with_empty_ffn_can_be_pruned_again(method, structure):
    """Zero-width linears hold nothing to prune: every method leaves them out and prunes the rest."""
    from surgeon_core.adapters import prunable_linears

    model = _empty_ffn(tiny_model("llama", seed=0))
    ad = adapter_for(model)
    materialize_(model, ad, ad.head_layout(model.config))
    names = list(prunable_linears(model, ad))
    assert not any(n.startswith("model.layers.1.mlp.") for n in names) and "model.layers.0.mlp.up_proj" in names
    prune(model, tiny_windows(2, 16), options=PruneOptions(method=method, structure=structure), target_size=0.5)
    after = count_parameters(model, ad)
    assert after["nonzero_prunable"] <= 0.52 * after["prunable"]


def test_coupled_pruning_of_a_materialized_model_with_empty_ffn_is_refused():
    model = _empty_ffn(tiny_model("llama", seed=0))
    ad = adapter_for(model)
    materialize_(model, ad, ad.head_layout(model.config))
    with pytest.raises(ValueError, match="materialized"):
        prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled"), target_size=0.5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_materialize_checked_reports_the_logit_check(family):
    """Materialization checks itself: the float64 logits of the smaller model equal the zeroed model's."""
    from surgeon.materialized_export import materialize_checked

    model = _pruned(family)
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

    model = _pruned("llama")
    ad = adapter_for(model)
    layout = ad.head_layout(model.config)
    bad = find_kept(model, ad, layout)
    bad[0] = dict(bad[0], ffn=bad[0]["ffn"][1:])  # drop a kept (nonzero) FFN unit of layer 0
    with pytest.raises(SurgeonError, match="does not compute the zeroed model's function"):
        materialize_checked(_pruned("llama"), [dict(k) for k in bad], align=1)
    model.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(scm, "find_kept", lambda *a: [dict(k) for k in bad])
    with pytest.raises(SurgeonError, match="does not compute"):
        materialize_dir(tmp_path / "src", tmp_path / "out", align=1)
    assert not (tmp_path / "out").exists()
    _, report = materialize_checked(_pruned("llama"), [dict(k) for k in bad], align=1, verify=False)
    assert "skipped" in report["equivalence"]


def test_cli_materialize_prints_the_check(tmp_path, capsys):
    from surgeon_cli.main import main

    _pruned("opt").save_pretrained(tmp_path / "src")
    assert main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "a")]) == 0
    assert "the zeroed model's function (max |Δlogit| float64" in capsys.readouterr().out
    assert main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "b"), "--no-verify"]) == 0
    assert "logit check skipped" in capsys.readouterr().out


def test_materialize_keeps_the_source_dtype(tmp_path):
    """A bf16 zeroed model is written as a bf16 materialized model (smaller, same weights), not upcast to fp32."""
    from safetensors import safe_open

    from surgeon.materialized_export import materialize_dir

    model = _pruned("llama").to(torch.bfloat16)
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


def test_materialize_refuses_a_model_with_nothing_to_drop(tmp_path, capsys):
    """A model without an all-zero unit (dense, or unstructured zeros) is refused in one line, nothing written."""
    from surgeon_cli.main import main
    from tiny_models import tiny_model as _tiny

    _tiny("llama").save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nothing to drop" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prune_materialize_step_warns_when_nothing_can_be_dropped(tmp_path, capsys):
    """After a pruning whose output has no all-zero unit, `prune --materialize` warns instead of failing the run."""
    from surgeon_cli.outputs import materialize_output as _materialize_output
    from tiny_models import tiny_model as _tiny

    _tiny("opt").save_pretrained(tmp_path / "pruned")
    report = _materialize_output(str(tmp_path / "pruned"))
    assert "nothing to drop" in report["skipped"]
    assert "warning: not materialized" in capsys.readouterr().err
    assert not (tmp_path / "pruned-materialized").exists()
