"""surgeon.sharded_load: 2 gloo processes each read only their FSDP2 slices of a saved model's decoder weights, and the
sharded model is the whole one (same parameters gathered, same buffers, same logits) for a plain, a tied-embedding
and a biased family; a random architecture is drawn in slices."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from gloo_ranks import run_ranks
from tiny_models import tiny_windows

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

WORLD = 2
FAMILIES = ("llama", "gemma3", "opt")


def _check(folder: str) -> dict:
    from torch.distributed.tensor import DTensor

    from surgeon.models import load_model
    from surgeon.sharded_load import load_sharded

    model, tok = load_sharded(folder, dtype=torch.float32, device="cpu")
    whole, _, _ = load_model(folder)
    ref, bufs = dict(whole.named_parameters(remove_duplicate=False)), dict(whole.named_buffers())
    params = dict(model.named_parameters(remove_duplicate=False))
    local = sum(p.to_local().numel() for p in params.values() if isinstance(p, DTensor))
    sharded = sum(p.numel() for p in params.values() if isinstance(p, DTensor))
    ids = tiny_windows(2, 12)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
    return {"equal": all(torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, ref[n])
                         for n, p in params.items()),
            "buffers": all(torch.equal(b, bufs[n]) for n, b in model.named_buffers()),
            "names": sorted(params) == sorted(ref), "local": local, "sharded": sharded, "logit_diff": diff,
            "decoder_sharded": all(isinstance(p, DTensor) for n, p in params.items() if ".layers." in n),
            "tokenizer": tok is not None}


def _random() -> dict:
    """random:smollm2-135m drawn in slices, twice with one seed and once with another."""
    from torch.distributed.tensor import DTensor

    from surgeon.sharded_load import random_sharded

    draws = [random_sharded("random:smollm2-135m", dtype=torch.float32, device="cpu", seed=s) for s in (0, 0, 1)]
    model = draws[0]
    up = [m.model.layers[3].mlp.up_proj.weight.to_local() for m in draws]
    decoder = [p for n, p in model.named_parameters() if ".layers." in n]
    out = {"up": up[0].clone(), "same_seed": torch.equal(up[0], up[1]), "other_seed": not torch.equal(up[0], up[2]),
           "std": float(up[0].std()), "sharded": all(isinstance(p, DTensor) for p in decoder),
           "norms": all(torch.all(p.to_local() == 1).item() for n, p in model.named_parameters() if "norm" in n),
           "tied": torch.equal(model.lm_head.weight, model.model.embed_tokens.weight.full_tensor())}
    with torch.no_grad():  # (after the checks: the forward leaves the root module's parameters unsharded)
        out["finite"] = bool(torch.isfinite(model(input_ids=tiny_windows(1, 8)).logits).all())
    return out


def _rank_results(root: str) -> dict:
    out = {family: _check(os.path.join(root, family)) for family in FAMILIES}
    out["random"] = _random()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from tiny_io import save_tiny

    root = tmp_path_factory.mktemp("sharded_load")
    for family in FAMILIES:
        save_tiny(root / family, family)
    return run_ranks(functools.partial(_rank_results, str(root)), root, WORLD)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_holds_its_slices_of_the_whole_model(ranks, family):
    for out in (r[family] for r in ranks):
        assert out["names"] and out["equal"] and out["buffers"] and out["tokenizer"] and out["decoder_sharded"]
        assert out["logit_diff"] == 0.0
    assert sum(r[family]["local"] for r in ranks) == ranks[0][family]["sharded"]  # the slices cover each weight once
    assert all(r[family]["local"] <= ranks[0][family]["sharded"] // WORLD + 1024 for r in ranks)


@pytest.mark.parametrize("rows,world", [(10, 2), (10, 3), (7, 4), (2, 4), (0, 2), (48, 2)])
def test_shard_rows_follow_torch_chunk(rows, world):
    from surgeon.sharded_load import shard_rows

    chunks = torch.arange(rows).chunk(world)
    for rank in range(world):
        start, n = shard_rows(rows, world, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, start + n)) == expected


def test_folders_that_cannot_be_read_in_slices(tmp_path):
    from surgeon.errors import SurgeonError
    from surgeon.sharded_load import can_load_sharded, load_sharded
    from tiny_io import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    assert can_load_sharded(folder)
    assert not can_load_sharded(tmp_path / "missing")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.gguf").write_bytes(b"GGUF")
    assert not can_load_sharded(tmp_path / "gguf")
    with pytest.raises(SurgeonError, match="need an initialised process group"):
        load_sharded(folder, dtype=torch.float32, device="cpu")


def test_a_random_architecture_is_drawn_in_slices(ranks):
    """Each rank draws its own slices (the two ranks' slices differ), reproducibly from the seed, with Llama's
    initialisation (std 0.02, norms 1) and the tied head equal to the whole embedding."""
    for out in (r["random"] for r in ranks):
        assert out["same_seed"] and out["other_seed"] and out["sharded"] and out["norms"] and out["tied"]
        assert out["finite"] and out["std"] == pytest.approx(0.02, rel=0.02)
    assert not torch.equal(ranks[0]["random"]["up"], ranks[1]["random"]["up"])


@pytest.mark.parametrize("sizes,files,expected", [
    ({"a": 10, "b": 10, "c": 10, "d": 10}, 2, {"a": 1, "b": 1, "c": 2, "d": 2}),
    ({"a": 100, "b": 1, "c": 1}, 2, {"a": 1, "b": 2, "c": 2}),
    ({"a": 5, "b": 5}, 1, {"a": 1, "b": 1}),
    ({"a": 1, "b": 1}, 4, {"a": 1, "b": 3}),  # more files than tensors: some files stay unused
])
def test_tensors_are_spread_over_files_by_bytes(sizes, files, expected):
    from surgeon.sharded_load import file_of_tensors

    assert file_of_tensors(sizes, files) == expected
