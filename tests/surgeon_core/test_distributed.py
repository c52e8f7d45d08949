"""Data-parallel curvature: 2 gloo processes on the CPU give one process's K-FAC factors and pruning masks.

The workers are spawned with torch.multiprocessing (file:// rendezvous in tmp_path); each builds the same tiny
random Llama, takes its share of the windows, and writes what it computed to tmp_path for the parent to compare
with a single-process run of the same calls. The torchrun launcher of the flow's shots:
tests/surgeon/test_launcher.py.
"""

from __future__ import annotations

import pytest
import torch

from gloo_ranks import run_ranks
from tiny_models import tiny_model, tiny_windows

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

WORLD = 2
STRUCTURES = ("structured", "unstructured", "2:4", "coupled", "structured+first-order")  # coupled: rank 0 alone
SHARDED = ("structured+sharded", "unstructured+sharded", "2:4+sharded")  # factors kept by their layer's rank
FSDP_SHOTS = ("structured", "unstructured", "2:4+sharded")  # shots on FSDP-sharded weights


def _factors(model, windows, **kw):
    from surgeon_core.adapters import adapter_for
    from surgeon_core.curvature import estimate_kfac

    f = estimate_kfac(model, windows, adapter=adapter_for(model), **kw)
    return {"A": f.A, "G": f.G, "grads": f.grads, "tokens": f.tokens}


def _owners(model, world: int | None = None) -> dict[str, int]:
    """The rank that solves each linear: under the running process group, or in a group of ``world``."""
    from surgeon_core.adapters import adapter_for, prunable_linears
    from surgeon_core.distributed import DataParallel, resolve
    from surgeon_core.placement import owners

    adapter = adapter_for(model)
    dp = resolve() if world is None else DataParallel(None, 0, world, "gloo")
    return owners(prunable_linears(model, adapter), adapter, dp)


def _shot(model, windows, structure, **options):
    from surgeon_core.methods import PruneOptions
    from surgeon_core.shot import prune_shot

    opts = PruneOptions(structure=structure.split("+")[0], batch_size=2, **options)
    rep = prune_shot(model, windows, options=opts, target_size=0.75)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "layers" in n}
    return {"weights": weights, "size": rep.achieved_size, "loss": rep.estimated_loss}


def _cases() -> dict:
    """Everything both runs compute: factors (even/uneven/empty shares, sampled labels) and two shots."""
    out = {}
    model = tiny_model("llama")
    out["empirical"] = _factors(model, tiny_windows(6, 24), batch_size=2, collect_weight_grads=True)
    out["sampled"] = _factors(model, tiny_windows(5, 24, seed=1), fisher="sampled", fisher_samples=2, seed=3)
    out["one_window"] = _factors(model, tiny_windows(1, 24), batch_size=1)  # rank 1 has no window
    out["packed"] = _factors(model, tiny_windows(1, 24), batch_size=1, passes=2, storage="packed")  # packed sums
    out["opt"] = _factors(tiny_model("opt"), tiny_windows(3, 24))  # bias column in A
    out["sharded_factors"] = _factors(model, tiny_windows(6, 24), batch_size=2, passes=2, owners=_owners(model))
    for structure in STRUCTURES + SHARDED:
        extra = {"first_order": True} if structure.endswith("first-order") else {}
        if structure.endswith("sharded"):
            extra = {"shard_factors": True, "factor_passes": 2}
        out[structure] = _shot(tiny_model("llama"), tiny_windows(6, 24), structure, **extra)
    return out


def _fsdp_model():
    """A tiny Llama whose decoder layers and body are sharded with FSDP2 (the vocabulary head stays whole)."""
    from torch.distributed.fsdp import fully_shard

    from surgeon_core.adapters import adapter_for, get_submodule

    model = tiny_model("llama")
    for layer in get_submodule(model, adapter_for(model).layers):
        fully_shard(layer)
    fully_shard(model.model)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
    return model


def _fsdp_shot(structure: str) -> dict:
    """:func:`_shot` on FSDP-sharded weights; the weights come back whole, gathered from the shards."""
    model = _fsdp_model()
    extra = {"shard_factors": True} if structure.endswith("sharded") else {}
    out = _shot(model, tiny_windows(6, 24), structure, **extra)
    out["weights"] = {n: p.full_tensor() for n, p in model.named_parameters() if "layers" in n}
    out["sharded"] = type(model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
    return out


def _fsdp_factors() -> dict:
    """The factors of a model whose decoder layers and body are sharded with FSDP2 (every rank holds a shard of each
    weight; the vocabulary head stays whole), data-parallel as usual."""
    return _factors(_fsdp_model(), tiny_windows(6, 24), batch_size=2)


def _rank_results() -> dict:
    out = _cases()
    out["fsdp"] = _fsdp_factors()
    for structure in FSDP_SHOTS:
        out[f"fsdp {structure}"] = _fsdp_shot(structure)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = run_ranks(_rank_results, tmp_path_factory.mktemp("dist"), WORLD)
    torch.set_num_threads(1)
    return _cases(), ranks


@pytest.mark.parametrize("case", ["empirical", "sampled", "one_window", "opt", "packed"])
def test_factors_match_one_process(runs, case):
    single, ranks = runs
    ref = single[case]
    if case == "packed":  # the sums were reduced packed, a rank without windows taking part with packed zeros
        assert all(t.dim() == 1 for r in (ref, *(x[case] for x in ranks)) for t in (*r["A"].values(), *r["G"].values()))
    for r in ranks:
        got = r[case]
        assert got["tokens"] == ref["tokens"]
        for kind in ("A", "G", "grads"):
            if kind == "grads" and case != "empirical":
                continue
            assert got[kind].keys() == ref[kind].keys() and ref[kind]
            for key in ref[kind]:
                scale = ref[kind][key].abs().max()
                torch.testing.assert_close(got[kind][key], ref[kind][key], rtol=1e-5, atol=1e-6 * float(scale))
    for kind in ("A", "G"):  # every rank holds bit-identical factors
        for key in ref[kind]:
            assert torch.equal(ranks[0][case][kind][key], ranks[1][case][kind][key])


def test_factors_of_a_model_with_fsdp_sharded_weights_match_one_process(runs):
    single, ranks = runs
    ref = single["empirical"]
    for r in ranks:
        for kind in ("A", "G"):
            assert r["fsdp"][kind].keys() == ref[kind].keys()
            for key in ref[kind]:
                scale = ref[kind][key].abs().max()
                torch.testing.assert_close(r["fsdp"][kind][key], ref[kind][key], rtol=1e-5, atol=1e-6 * float(scale))


@pytest.mark.parametrize("structure", FSDP_SHOTS)
def test_a_shot_on_fsdp_sharded_weights_matches_one_process(runs, structure):
    single, ranks = runs
    ref = single[structure]
    for r in ranks:
        got = r[f"fsdp {structure}"]
        assert got["sharded"] and got["size"] == ref["size"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        for name, w in ref["weights"].items():
            assert torch.equal(got["weights"][name] == 0, w == 0), name
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-3, atol=1e-5)


def test_sharded_factors_are_kept_by_their_layers_rank_alone(runs):
    single, ranks = runs
    ref, owners = single["sharded_factors"], _owners(tiny_model("llama"), WORLD)
    assert ref["A"].keys() == single["empirical"]["A"].keys()  # one process owns everything
    assert set(owners.values()) == {0, 1}
    for kind in ("A", "G"):
        held = [set(r["sharded_factors"][kind]) for r in ranks]
        assert held[0].isdisjoint(held[1]) and held[0] | held[1] == set(ref[kind])
        for rank, keys in enumerate(held):
            assert keys and all(owners[key] == rank for key in keys)
            for key in keys:
                scale = ref[kind][key].abs().max()
                torch.testing.assert_close(ranks[rank]["sharded_factors"][kind][key], ref[kind][key], rtol=1e-5,
                                           atol=1e-6 * float(scale))


def test_factor_memory_predicts_what_the_fullest_rank_keeps(runs):
    from surgeon_core.adapters import adapter_for
    from surgeon_core.curvature import factor_memory

    _, ranks = runs
    held = [sum(M.numel() * M.element_size() for kind in ("A", "G") for M in r["sharded_factors"][kind].values())
            for r in ranks]
    model = tiny_model("llama")
    assert factor_memory(model, adapter_for(model), world=WORLD, passes=2, shard=True)["stored"] == max(held)


@pytest.mark.parametrize("structure", STRUCTURES + SHARDED)
def test_shot_masks_match_one_process(runs, structure):
    single, ranks = runs
    ref = single[structure]
    assert ref["size"] < 0.8
    for r in ranks:
        got = r[structure]
        assert got["size"] == ref["size"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        # the first-order Newton step G⁻¹∇W A⁻¹ (damping 0.01) amplifies the gradient's fp32 rounding differences
        tol = dict(rtol=1e-2, atol=5e-3) if structure.endswith("first-order") else dict(rtol=1e-3, atol=1e-5)
        for name, w in ref["weights"].items():
            assert torch.equal(got["weights"][name] == 0, w == 0), name  # the same masks
            torch.testing.assert_close(got["weights"][name], w, **tol)
    for name in ref["weights"]:  # each layer's solver broadcast its weights: the ranks are identical
        assert torch.equal(ranks[0][structure]["weights"][name], ranks[1][structure]["weights"][name])


def test_share_is_contiguous_and_balanced():
    from surgeon_core.distributed import share

    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [share(n, r, world) for r in range(world)]
            covered = [i for p in parts for i in range(n)[p]]
            assert covered == list(range(n))
            sizes = [len(range(n)[p]) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_process_group_without_init_is_an_error():
    from surgeon_core.distributed import resolve

    assert resolve() is None
    with pytest.raises(ValueError, match="not initialised"):
        resolve(object())


def test_spread_placement_covers_every_factor_and_balances_layers():
    """factor_device='spread' (13B on 2 GPUs): every factor key gets a device, in contiguous balanced blocks."""
    from surgeon_core.adapters import adapter_for
    from surgeon_core.curvature import estimate_kfac, spread_devices
    from tiny_models import tiny_model, tiny_windows

    model = tiny_model("llama")
    adapter = adapter_for(model)
    devices = [torch.device("cpu"), torch.device("meta")]
    placement = spread_devices(model, adapter, devices)
    factors = estimate_kfac(model, tiny_windows(), adapter=adapter)
    assert set(factors.A) | set(factors.G) <= set(placement)
    layer_dev = [placement[f"{adapter.layers}.{i}.{adapter.linears[0]}"] for i in range(model.config.num_hidden_layers)]
    first_meta = layer_dev.index(devices[1]) if devices[1] in layer_dev else len(layer_dev)
    assert all(d == devices[0] for d in layer_dev[:first_meta]) and all(d == devices[1] for d in layer_dev[first_meta:])
    assert abs(first_meta - len(layer_dev) / 2) <= 1
    with pytest.raises(ValueError, match="spread"):
        estimate_kfac(model, tiny_windows(), adapter=adapter, factor_device="spread")  # CPU: refused
