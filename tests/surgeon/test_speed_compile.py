"""The compiled speed path (surgeon.speed.CompiledRunner): static KV cache and compiled steps decode exactly like
the eager path, also for a materialized model whose layers have different kv-head counts."""

import copy
import shutil

import pytest
import torch

from surgeon import speed
from tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.integration


def _materialized(dense, layer1_ffn=64):
    """A copy of ``dense`` sliced to per-layer sizes: layer 0 keeps 40 FFN units, 4 heads in 2 kv groups; layer 1
    keeps ``layer1_ffn`` units (0: an EmptyMLP), 2 heads in 1 kv group (so the layers' kv-head counts differ)."""
    from surgeon.materialized_export import materialize_model

    kept = [{"ffn": torch.arange(40), "heads": torch.tensor([0, 1, 2, 3]), "kv": torch.tensor([0, 1])},
            {"ffn": torch.arange(10, 10 + layer1_ffn), "heads": torch.tensor([2, 3]), "kv": torch.tensor([1])}]
    model, report = materialize_model(copy.deepcopy(dense), kept, align=1)
    assert [x["num_kv_heads"] for x in report["layers"]] == [2, 1]
    return model.eval()


@pytest.fixture(scope="module")
def models():
    dense = tiny_model("llama", seed=0)
    return {"dense": dense, "pruned": _materialized(dense), "no_ffn": _materialized(dense, layer1_ffn=0)}


def _prompt(batch=3, length=8, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _check_same(model, runner, steps=6):
    prompt = _prompt()
    ref_tokens, ref_logits = speed.greedy_decode(model, prompt, steps)
    for _ in range(2):  # the second call reuses (resets) the static cache
        _, tokens, logits = runner.decode(prompt, steps, keep=True)
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["dense", "pruned", "no_ffn"])
def test_static_cache_decode_matches_eager(models, name):
    model = models[name]
    runner = speed.CompiledRunner(model, compile_prefill=False, compile_decode=False)
    _check_same(model, runner)
    layers = runner._cache.layers
    if name != "dense":  # one static tensor pair per layer, each with that layer's own kv-head count
        assert [layer.keys.shape[1] for layer in layers] == [2, 1]
    assert all(layer.keys.shape[2] == 8 + 6 for layer in layers)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["dense", "pruned", "no_ffn"])
def test_compiled_step_decode_matches_eager(models, name):
    """dynamo traces the decode step (fullgraph, static cache); the eager backend keeps this fast on a CPU."""
    model = models[name]
    runner = speed.CompiledRunner(model, backend="eager")
    _check_same(model, runner)
    assert runner.fullgraph == {"prefill": True, "decode": True} and not runner.notes


@pytest.mark.heavy
def test_compare_compile_same_keys(models):
    kw = dict(repeats=1, prefill_len=16, prompt_len=8, decode_tokens=4, decode_batch=2)
    eager = speed.compare(models["dense"], models["pruned"], **kw)
    comp = speed.compare(models["dense"], models["pruned"], compile=True, compile_backend="eager", **kw)
    assert set(comp) == set(eager)
    assert set(eager["dense"]) <= set(comp["dense"])
    assert eager["settings"]["compile"] is False and comp["settings"]["compile"] is True
    assert comp["settings"]["static_cache"] and comp["settings"]["warmup"] >= 1
    for name in ("dense", "pruned"):
        assert comp[name]["decode_tokens_per_s"] > 0 and comp[name]["prefill_tokens_per_s"] > 0
        assert set(comp[name]["compile_seconds"]) == {"prefill", "decode"}
        assert comp[name]["compile_notes"] == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="inductor needs a C++ compiler")
def test_inductor_decode_and_compare(models):
    """The real recipe (inductor; on a CPU without CUDA graphs): the same tokens, and compare runs end to end."""
    model = models["pruned"]
    _check_same(model, speed.CompiledRunner(model))
    res = speed.compare(models["dense"], model, compile=True, repeats=1, prefill_len=16, prompt_len=8,
                        decode_tokens=4)
    assert res["settings"]["compile_backend"] == "inductor" and res["settings"]["cuda_graphs"]["decode"] is False
    assert res["prefill_speedup"] > 0 and res["decode_speedup"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager(models):
    """On a GPU: the decode step as a replayed CUDA graph (reduce-overhead) gives the eager tokens."""
    for name in ("dense", "pruned", "no_ffn"):
        model = copy.deepcopy(models[name]).cuda()
        runner = speed.CompiledRunner(model)
        assert runner.cuda_graphs("decode")
        prompt = _prompt().cuda()
        ref_tokens, ref_logits = speed.greedy_decode(model, prompt, 6)
        for _ in range(3):  # warm-up, recording, replays
            _, tokens, logits = runner.decode(prompt, 6, keep=True)
            assert torch.equal(tokens, ref_tokens)
            assert (logits - ref_logits).abs().max() <= 1e-3
        assert not runner.notes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_whole_step_cuda_graph_decode_matches_eager(models):
    """On a GPU: the whole step (compiled forward + greedy pick) captured as one CUDA graph gives the eager tokens,
    also on calls after the capture (the cache is reset and reused) and for a second prompt."""
    for name in ("dense", "pruned", "no_ffn"):
        model = copy.deepcopy(models[name]).cuda()
        runner = speed.CompiledRunner(model, decode_graph=True)
        assert not runner.cuda_graphs("decode")  # inductor's own graphs stay off inside ours
        for seed in (1, 1, 2):
            prompt = _prompt(seed=seed).cuda()
            ref_tokens, ref_logits = speed.greedy_decode(model, prompt, 6)
            _, tokens, logits = runner.decode(prompt, 6, keep=True)
            assert torch.equal(tokens, ref_tokens)
            assert (logits - ref_logits).abs().max() <= 1e-3
        assert not runner.notes
        res = speed.compare(copy.deepcopy(models["dense"]).cuda(), model, compile=True, decode_graph=True, repeats=1,
                            prefill_len=16, prompt_len=8, decode_tokens=4)
        assert res["settings"]["decode_graph"] is True and res["decode_speedup"] > 0


def test_structure_report_device_is_checked_before_any_work():
    from surgeon.speed import structure_report

    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        structure_report("no-such-dir", "no-such-dir", device="tpu")
    with pytest.raises(ValueError, match="flex decode attention is for the GPU"):
        structure_report("no-such-dir", "no-such-dir", device="cpu", decode_attention="flex")
    with pytest.raises(ValueError, match="decode attention must be one of"):
        structure_report("no-such-dir", "no-such-dir", decode_attention="flash")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            structure_report("no-such-dir", "no-such-dir", device="cuda")


@pytest.mark.parametrize("name", ["dense", "pruned"])
def test_flex_decode_attention_gives_the_sdpa_tokens(models, name, monkeypatch):
    """Decode steps through FlexAttention (a BlockMask from the static cache's mask, blocks of 4 positions, so the
    unwritten ones are skipped) give the SDPA tokens; eager here (FlexAttention's reference path on a CPU), also
    for layers with different kv-head counts; switching back restores SDPA. The flex kernel really runs: once per
    layer in every decode step (the prompt pass stays SDPA)."""
    import torch.nn.attention.flex_attention as flex_mod
    import transformers.integrations.sdpa_attention as sdpa_mod

    calls = {"flex": 0, "sdpa": 0}  # _flex_decode_attention imports both names when called: spied there
    real_flex, real_sdpa = flex_mod.flex_attention, sdpa_mod.sdpa_attention_forward

    def flex_spy(*args, **kwargs):
        calls["flex"] += 1
        assert isinstance(kwargs["block_mask"], flex_mod.BlockMask)
        return real_flex(*args, **kwargs)

    def sdpa_spy(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(flex_mod, "flex_attention", flex_spy)
    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", sdpa_spy)
    model = copy.deepcopy(models[name])
    n_layers, steps = model.config.num_hidden_layers, 10
    prompt = _prompt()
    ref = speed.CompiledRunner(model, compile_prefill=False, compile_decode=False).decode(prompt, steps, keep=True)
    assert calls == {"flex": 0, "sdpa": 0}  # plain SDPA does not go through the flex wrapper
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    speed.set_decode_attention(model, "flex", block=4)
    assert model.config._attn_implementation == speed.FLEX_DECODE
    assert inductor_config.get_config_copy() == before  # nothing global: the option goes with this model's compile
    assert speed._inductor_options(model) == {"prologue_fusion": False}
    got = speed.CompiledRunner(model, compile_prefill=False, compile_decode=False).decode(prompt, steps, keep=True)
    assert calls == {"flex": steps * n_layers, "sdpa": n_layers}  # 10 steps x 2 layers flex; the prompt pass SDPA
    assert torch.equal(got[1], ref[1])
    assert (got[2] - ref[2]).abs().max() <= 1e-4
    speed.set_decode_attention(model, "sdpa")
    assert model.config._attn_implementation == "sdpa" and speed._inductor_options(model) == {}
    with pytest.raises(ValueError, match="decode attention must be one of"):
        speed.set_decode_attention(model, "flash")


def test_flex_decode_attention_needs_compiled_models(models):
    with pytest.raises(ValueError, match="needs compile=True"):
        speed.compare(models["dense"], models["pruned"], decode_attention="flex", repeats=1)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="inductor needs a C++ compiler")
def test_flex_decode_compiled_by_inductor_on_cpu(models):
    """inductor's C++ FlexAttention kernel in the compiled decode step: the eager SDPA tokens, fullgraph, and
    compare runs end to end with it."""
    for name in ("dense", "pruned"):
        model = copy.deepcopy(models[name])
        prompt = _prompt()
        ref_tokens, ref_logits = speed.greedy_decode(model, prompt, 12)
        speed.set_decode_attention(model, "flex", block=16)
        runner = speed.CompiledRunner(model, compile_prefill=False)
        _, tokens, logits = runner.decode(prompt, 12, keep=True)
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max() <= 1e-4
        assert runner.fullgraph["decode"] and not runner.notes
    res = speed.compare(copy.deepcopy(models["dense"]), copy.deepcopy(models["pruned"]), compile=True, repeats=1,
                        prefill_len=16, prompt_len=8, decode_tokens=4, decode_attention="flex", flex_block=16)
    assert res["settings"]["decode_attention"] == "flex" and res["decode_speedup"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_decode_in_whole_step_cuda_graph_matches_eager(models):
    """On a GPU: FlexAttention's compiled decoding kernel inside the whole-step CUDA graph gives the eager SDPA
    tokens, for the dense and the materialized model, over repeated calls."""
    for name in ("dense", "pruned"):
        model = copy.deepcopy(models[name]).cuda()
        prompt = _prompt().cuda()
        ref_tokens, ref_logits = speed.greedy_decode(model, prompt, 12)
        speed.set_decode_attention(model, "flex", block=16)  # 8 + 12 positions: the second block is skipped first
        runner = speed.CompiledRunner(model, decode_graph=True)
        for _ in range(3):
            _, tokens, logits = runner.decode(prompt, 12, keep=True)
            assert torch.equal(tokens, ref_tokens)
            assert (logits - ref_logits).abs().max() <= 1e-3
        assert not runner.notes


def test_decode_graph_needs_a_gpu_and_compile():
    model = tiny_model("llama", seed=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not a GPU"):
            speed.CompiledRunner(model, decode_graph=True)
    with pytest.raises(ValueError, match="compile=True"):
        speed.compare(model, model, decode_graph=True)
