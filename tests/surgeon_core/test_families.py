"""Every method x structure on a tiny random model of every family (Llama with and without GQA, Mistral with and
without a sliding window, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 with its fused layers, OPT): sizes on target,
N:M masks valid along the input dimension, coupled units whole across fused layers, and the layer-wise driver
feeding each layer its own mask and rotary tables. Materialization per family: tests/surgeon/test_families_export.py."""

import pytest
import torch

from surgeon_core.adapters import adapter_for, get_submodule, prunable_linears
from surgeon_core.coupled import layer_units
from surgeon_core.shot import PruneOptions
from tiny_models import ALL_FAMILIES, prune, tiny_model, tiny_windows

pytestmark = pytest.mark.integration

KFAC_STRUCTURES = ("unstructured", "2:4", "structured", "coupled")
BASELINES = [("magnitude", s) for s in ("unstructured", "2:4", "structured", "coupled")]
BASELINES += [(m, s) for m in ("wanda", "sparsegpt") for s in ("unstructured", "2:4")]
BASELINES += [(m, "coupled") for m in ("kobd", "lobd")]


def _target(structure: str) -> float:
    return 0.5 if structure == "2:4" else 0.6


def _check(model, structure: str, report) -> None:
    target = _target(structure)
    assert abs(report.achieved_size - target) <= 0.01, (structure, report.achieved_size)
    for name, lin in prunable_linears(model).items():
        assert torch.isfinite(lin.weight).all(), name
        if structure == "2:4":  # every 4 consecutive inputs of a row keep at most 2 weights
            nz = (lin.weight != 0).view(lin.out_features, -1, 4).sum(-1)
            assert (nz <= 2).all(), name


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("structure", KFAC_STRUCTURES)
def test_llm_surgeon_every_structure(family, structure):
    model = tiny_model(family)
    mc = None if structure in ("structured", "coupled") else 64
    reports = prune(model, tiny_windows(4, 16), options=PruneOptions(structure=structure, max_correlate=mc),
                    target_size=_target(structure), num_shots=1)
    _check(model, structure, reports[-1])


@pytest.mark.heavy
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_baselines_every_structure(family):
    for method, structure in BASELINES:
        model = tiny_model(family)
        reports = prune(model, tiny_windows(4, 16), options=PruneOptions(method=method, structure=structure),
                        target_size=_target(structure))
        _check(model, structure, reports[-1])


@pytest.mark.parametrize("family", ["phi3", "gemma3", "llama_mha"])
def test_coupled_units_span_every_segment(family):
    """A coupled unit zeroes its rows in every segment of a fused layer and its consumer columns, nothing in part."""
    model = tiny_model(family)
    prune(model, tiny_windows(4, 16), options=PruneOptions(structure="coupled"), target_size=0.6)
    ad = adapter_for(model)
    layout = ad.head_layout(model.config)
    n_heads, n_kv, hd = layout
    dead_units = []
    for layer in get_submodule(model, ad.layers):
        down = get_submodule(layer, ad.mlp_out).weight
        inter = down.shape[1]
        col_dead = (down == 0).all(dim=0)
        dead_units.append(col_dead)
        for name, off in ad.mlp_rows(inter):
            rows_dead = (get_submodule(layer, name).weight[off: off + inter] == 0).all(dim=1)
            assert torch.equal(rows_dead, col_dead), name
        o_dead = (get_submodule(layer, ad.attention_out).weight == 0).reshape(-1, n_heads, hd).all(dim=(0, 2))
        rows = ad.attention_rows(layout)
        q, q0 = rows["q"]
        q_dead = (get_submodule(layer, q).weight[q0: q0 + n_heads * hd] == 0).reshape(n_heads, hd, -1).all(dim=(1, 2))
        assert torch.equal(q_dead, o_dead)
        for role in ("k", "v"):  # a kv group goes when all of its query heads went
            name, off = rows[role]
            kv_dead = (get_submodule(layer, name).weight[off: off + n_kv * hd] == 0).reshape(n_kv, -1).all(dim=1)
            assert torch.equal(kv_dead, o_dead.reshape(n_kv, -1).all(dim=1))
    dead_units = torch.cat(dead_units)
    assert dead_units.any() and not dead_units.all()


def test_fused_units_are_one_member_per_linear():
    model = tiny_model("phi3")
    ad = adapter_for(model)
    layer = get_submodule(model, ad.layers)[0]
    fams, part_params = layer_units(layer, ad, ad.head_layout(model.config), 0)
    ffn, head, kv = fams
    assert [(n, a, tuple(i.shape)) for n, a, i in ffn.members] == [("mlp.gate_up_proj", "rows", (96, 2)),
                                                                   ("mlp.down_proj", "cols", (96, 1))]
    assert ffn.members[0][2][5].tolist() == [5, 96 + 5]  # gate row j with up row j
    # kv group 1 of 2: query heads 2, 3 (rows 32..63), k rows 64+16.., v rows 96+16.. of the fused qkv
    (qkv, axis, idx), (o, _, cols) = kv.members
    assert qkv == "self_attn.qkv_proj" and idx.shape == (2, 2 * 16 + 16 + 16)
    assert idx[1].tolist() == list(range(32, 64)) + list(range(80, 96)) + list(range(112, 128))
    assert cols[1].tolist() == list(range(32, 64))
    assert part_params[(0, "ffn", 0)] == 2 * 64 + 64 and part_params[(0, "kv", 0)] == 16 * (64 + 64)


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "mistral_swa"])
def test_layerwise_driver_feeds_each_layer_its_own_mask_and_rotary(family):
    """Run unpruned through the layer-wise driver, every layer's output equals the model's own forward (Gemma's full
    attention layers get their mask and rotary tables, not the sliding layer 0's)."""
    from surgeon_core import sequential as S

    model = tiny_model(family)
    ad = adapter_for(model)
    windows = tiny_windows(2, 16)  # longer than the sliding window (8)
    expected = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: expected.append(out[0] if isinstance(out, tuple)
                                                                                else out))
               for layer in get_submodule(model, ad.layers)]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    got = []
    S.run_layerwise(model, windows, adapter=ad, batch_size=2, make_stats=None,
                    prune_layer=lambda i, linears, stats: got.append(i) or {})
    batches = S.capture_layer_inputs(model, windows, adapter=ad, batch_size=2, device=torch.device("cpu"),
                                     offload_device=torch.device("cpu"))
    hidden = batches[0].hidden
    for i, layer in enumerate(get_submodule(model, ad.layers)):
        batches[0].for_layer(i)
        hidden = S._run_layer(layer, S.LayerInputs(hidden, batches[0].args, batches[0].kwargs), torch.device("cpu"))
        torch.testing.assert_close(hidden, expected[i], rtol=0, atol=1e-5)
    assert got == list(range(len(expected)))
