"""Materialization (surgeon_core.materialize): all-zero units dropped, per-layer smaller model, logits equal to the
zeroed model's; a materialized model can be pruned again. Writing it to disk: tests/surgeon/test_materialized_export.py;
the command: tests/surgeon_cli/test_cli_materialize.py."""

import pytest
import torch

from surgeon_core import PruneOptions, adapter_for
from surgeon_core.adapters import get_submodule
from surgeon_core.materialize import count_parameters, find_kept, materialize_
from tiny_models import coupled_pruned, empty_ffn, prune, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_materialized_logits_equal_zeroed(family):
    model = coupled_pruned(family)
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


@pytest.mark.parametrize("align", [4, 8])
def test_aligned_widths_keep_logits(align):
    """Padding FFN widths to a multiple of ``align`` keeps only all-zero extra units: logits unchanged."""
    model = coupled_pruned("llama")
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


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layer_without_ffn_units_is_materialized_empty(family):
    """No unit left: the layer keeps no placeholder unit (nor alignment padding); a Llama-like FFN becomes an
    EmptyMLP that does no work, OPT keeps zero-width fc1/fc2 (fc2 still adds its bias); logits unchanged."""
    from surgeon_core.materialize import EmptyMLP

    model = empty_ffn(coupled_pruned(family))
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


@pytest.mark.parametrize("method,structure", [pytest.param("llm-surgeon", "unstructured", marks=pytest.mark.heavy),
                                              pytest.param("llm-surgeon", "2:4", marks=pytest.mark.heavy),
                                              ("llm-surgeon", "structured"), ("wanda", "2:4"),
                                              ("sparsegpt", "unstructured"), ("magnitude", "unstructured")])
def test_materialized_model_with_empty_ffn_can_be_pruned_again(method, structure):
    """Zero-width linears hold nothing to prune: every method leaves them out and prunes the rest."""
    from surgeon_core.adapters import prunable_linears

    model = empty_ffn(tiny_model("llama", seed=0))
    ad = adapter_for(model)
    materialize_(model, ad, ad.head_layout(model.config))
    names = list(prunable_linears(model, ad))
    assert not any(n.startswith("model.layers.1.mlp.") for n in names) and "model.layers.0.mlp.up_proj" in names
    prune(model, tiny_windows(2, 16), options=PruneOptions(method=method, structure=structure), target_size=0.5)
    after = count_parameters(model, ad)
    assert after["nonzero_prunable"] <= 0.52 * after["prunable"]


def test_coupled_pruning_of_a_materialized_model_with_empty_ffn_is_refused():
    model = empty_ffn(tiny_model("llama", seed=0))
    ad = adapter_for(model)
    materialize_(model, ad, ad.head_layout(model.config))
    with pytest.raises(ValueError, match="materialized"):
        prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled"), target_size=0.5)
