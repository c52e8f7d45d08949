"""Baselines (magnitude, Wanda, SparseGPT) and the sequential layer-wise driver.

Math cases are small enough to check by hand; driver cases run tiny random models on the CPU.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import surgeon_core.baselines as baselines_module
from surgeon_core.adapters import adapter_for, get_submodule, prunable_linears
from surgeon_core.baselines import (
    InputStats,
    accumulate_hessian_,
    accumulate_sq_norms_,
    flatten_inputs,
    magnitude_mask,
    math_dtype,
    prune_model_layerwise,
    sparsegpt_prune,
    wanda_mask,
)
from surgeon_core.lm import hidden_states
from surgeon_core.sequential import run_layerwise
from tiny_models import FAMILIES, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def _arange_weight(d_out: int, d_in: int) -> torch.Tensor:
    return torch.arange(1, d_out * d_in + 1, dtype=torch.float32).view(d_out, d_in)


def _correlated_inputs(d_in: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    return torch.randn(n, d_in, generator=g) @ mix  # (n, d_in), strongly correlated columns


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------


def test_streaming_statistics_equal_batch_formulas():
    X = _correlated_inputs(6, 40, seed=0)
    H, s, n = torch.zeros(6, 6), torch.zeros(6), 0
    for chunk in (X[:7].view(1, 7, 6), X[7:20], X[20:].view(4, 5, 6)):  # (B, T, C) and (N, C) inputs
        Xc = flatten_inputs(chunk)
        n = accumulate_hessian_(H, n, Xc)
        accumulate_sq_norms_(s, Xc)
    assert n == 40
    torch.testing.assert_close(H, 2 / 40 * X.T @ X)
    torch.testing.assert_close(s, (X**2).sum(0))


def test_flatten_inputs_is_float32_tokens_by_features():
    x = torch.ones(2, 3, 5, dtype=torch.bfloat16)
    assert flatten_inputs(x).shape == (6, 5) and flatten_inputs(x).dtype == torch.float32
    assert flatten_inputs(x, torch.float64).dtype == torch.float64


def test_statistics_follow_a_float64_model():
    X = _correlated_inputs(6, 40, seed=0).double()
    stats = InputStats(6, hessian=True, sq_norms=True, device="cpu", dtype=torch.float64)
    stats.update(X.view(4, 10, 6))
    assert stats.H.dtype == stats.sq_norms.dtype == torch.float64
    torch.testing.assert_close(stats.H, 2 / 40 * X.T @ X, rtol=1e-14, atol=1e-14)
    assert math_dtype(torch.ones(1, dtype=torch.bfloat16)) == torch.float32
    assert math_dtype(torch.ones(1), torch.ones(1, dtype=torch.float64)) == torch.float64


def test_float64_statistics_widen_fp32_inputs_in_chunks(monkeypatch):
    """float64 statistics of fp32 inputs are accumulated a row chunk at a time (bounded transient copies): the
    same statistics as one widened copy to float64 rounding, with the sample count intact; fp32 statistics of fp32
    inputs take the one-copy path unchanged (bit for bit)."""
    X = _correlated_inputs(6, 40, seed=1)
    monkeypatch.setattr(InputStats, "WIDEN_CHUNK_BYTES", 7 * 6 * 8)  # 7 rows per chunk: 6 chunks, the last short
    calls = []
    original = baselines_module.accumulate_hessian_
    monkeypatch.setattr(baselines_module, "accumulate_hessian_",
                        lambda H, n, Xc: calls.append(len(Xc)) or original(H, n, Xc))
    stats = InputStats(6, hessian=True, sq_norms=True, device="cpu", dtype=torch.float64)
    stats.update(X.view(4, 10, 6))
    assert calls == [7, 7, 7, 7, 7, 5] and stats.n == 40
    Xd = X.double()
    torch.testing.assert_close(stats.H, 2 / 40 * Xd.T @ Xd, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(stats.sq_norms, (Xd**2).sum(0), rtol=1e-13, atol=1e-13)
    calls.clear()
    fp32 = InputStats(6, hessian=True, sq_norms=False, device="cpu")
    fp32.update(X.view(4, 10, 6))
    assert calls == [40]
    assert torch.equal(fp32.H, _one_copy_hessian(X))


def _one_copy_hessian(X: torch.Tensor) -> torch.Tensor:
    H = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype)
    accumulate_hessian_(H, 0, X)
    return H


# ---------------------------------------------------------------------------------------------------------------
# magnitude and Wanda masks (True = kept)
# ---------------------------------------------------------------------------------------------------------------


def test_magnitude_2_4_by_hand():
    linear = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_arange_weight(1, 8))
    pruned = linear.weight * magnitude_mask(linear.weight, 0.5, (2, 4))
    assert pruned.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_magnitude_unstructured_is_layer_wide_not_per_row():
    W = _arange_weight(2, 4)
    assert magnitude_mask(W, 0.5).tolist() == [[False] * 4, [True] * 4]


def test_magnitude_exact_count_and_deterministic_ties():
    W = torch.tensor([[0.5, -0.5, 0.5, 0.5, -0.5, 0.5, 0.5, 2.0]])  # 7 ties (de-quantized weights tie often)
    mask = magnitude_mask(W, 0.5)
    assert mask.tolist() == [[False, False, False, False, True, True, True, True]]  # lower index pruned first
    assert int((~magnitude_mask(torch.ones(10, 10), 0.29)).sum()) == 29  # floor, robust to 0.29 * 100 = 28.99...


def test_wanda_keeps_high_norm_inputs():
    W = torch.ones(1, 4)
    norms = torch.tensor([100.0, 10.0, 1.0, 0.1])
    assert wanda_mask(W, norms**2, 0.5).tolist() == [[True, True, False, False]]


def test_wanda_compares_per_row():
    W = _arange_weight(2, 4)
    assert (W * wanda_mask(W, torch.ones(4), 0.5)).tolist() == [[0, 0, 3, 4], [0, 0, 7, 8]]
    # the activation norm can overturn magnitude: column 0 is 100x louder
    assert wanda_mask(W, torch.tensor([1e4, 1.0, 1.0, 1.0]), 0.5).tolist() == [[True, False, False, True]] * 2


def test_wanda_n_m_by_hand():
    W = torch.ones(1, 8)
    sq = torch.tensor([1.0, 4.0, 9.0, 0.0, 16.0, 1.0, 0.0, 25.0])
    assert wanda_mask(W, sq, 0.5, (2, 4)).int().tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize(
    "call",
    [
        lambda: magnitude_mask(torch.ones(2, 8), 0.0),
        lambda: magnitude_mask(torch.ones(2, 8), 1.0),
        lambda: magnitude_mask(torch.ones(2, 6), 0.5, (2, 4)),  # 6 inputs are not groups of 4
        lambda: magnitude_mask(torch.ones(2, 8), 0.7, (2, 4)),  # 2:4 is 50%
        lambda: magnitude_mask(torch.ones(2, 8), 0.5, (4, 4)),
        lambda: wanda_mask(torch.ones(2, 8), torch.ones(7), 0.5),
        lambda: sparsegpt_prune(torch.ones(2, 8), torch.eye(7), 0.5),
        lambda: sparsegpt_prune(torch.ones(2, 8), torch.eye(8), 0.5, (2, 4), block_size=6),
    ],
)
def test_invalid_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------------------------------------
# SparseGPT
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_with_identity_hessian_is_magnitude_without_update(n_m):
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    W_new, mask, loss = sparsegpt_prune(W, torch.eye(16), 0.5, n_m)
    expected = magnitude_mask(W, 0.5, n_m)  # one block of 16 columns: block-wide = layer-wide selection
    assert torch.equal(mask, expected)
    assert torch.equal(W_new, W * expected)  # H = I: no correlations, so nothing to compensate
    torch.testing.assert_close(loss, (W[~mask] ** 2).sum() / 2 * 1.01)  # loss = w² / (2 [U_jj]²), U_jj² = 1 / 1.01


@pytest.mark.parametrize("n_m", [None, (2, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_reconstructs_better_than_zeroing(n_m, seed):
    d_out, d_in = 12, 32
    X = _correlated_inputs(d_in, 256, seed)  # (n, d_in)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 100))
    H = torch.zeros(d_in, d_in)
    accumulate_hessian_(H, 0, X)
    W_sgpt, mask, loss = sparsegpt_prune(W, H, 0.5, n_m, block_size=8)
    assert W_sgpt.shape == W.shape and mask.dtype == torch.bool
    assert math.isfinite(float(loss)) and float(loss) > 0  # half the weights removed: a positive loss
    assert int((W_sgpt == 0).sum()) == W.numel() // 2 and torch.equal(W_sgpt != 0, mask)

    def error(W_hat):
        return torch.linalg.norm((W - W_hat) @ X.T)

    e_sgpt = error(W_sgpt)
    assert e_sgpt <= error(W * magnitude_mask(W, 0.5, n_m))
    assert e_sgpt <= error(W * wanda_mask(W, (X**2).sum(0), 0.5, n_m))
    assert e_sgpt <= error(W * mask)  # the update beats zeroing with its own mask


def test_sparsegpt_dead_columns_and_dtype():
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    X = _correlated_inputs(8, 64, 0)
    X[:, 3] = 0  # input feature 3 is never active: H_33 = 0
    H = torch.zeros(8, 8)
    accumulate_hessian_(H, 0, X)
    W_new, mask, loss = sparsegpt_prune(W, H, 0.5)
    assert W_new.dtype == torch.bfloat16 and torch.isfinite(W_new.float()).all() and torch.isfinite(loss)
    assert (W_new[:, 3] == 0).all() and (~mask[:, 3]).all()
    assert H[3, 3] == 0  # the caller's H is untouched


def test_sparsegpt_lazy_blocks_are_exact_in_float64():
    # Lazy batching only defers the updates of later columns; with N:M (chosen every M columns on the weights as
    # updated so far) the result cannot depend on the block size. In float64 that holds to rounding level.
    d_out, d_in = 8, 32
    X = _correlated_inputs(d_in, 128, seed=3).double()
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = torch.zeros(d_in, d_in, dtype=torch.float64)
    accumulate_hessian_(H, 0, X)
    W4, mask4, loss4 = sparsegpt_prune(W, H, 0.5, (2, 4), block_size=4)
    W32, mask32, loss32 = sparsegpt_prune(W, H, 0.5, (2, 4), block_size=32)
    assert W4.dtype == loss4.dtype == torch.float64
    assert torch.equal(mask4, mask32)
    torch.testing.assert_close(W4, W32, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss4, loss32, rtol=1e-12, atol=0)


def test_sparsegpt_singular_hessian_escalates_damping():
    X = _correlated_inputs(16, 4, 0)  # 4 samples for 16 features: H has rank 4
    H = torch.zeros(16, 16)
    accumulate_hessian_(H, 0, X)
    W_new, _, loss = sparsegpt_prune(torch.randn(3, 16), H, 0.5, dampening_frac=0.0)
    assert torch.isfinite(W_new).all() and torch.isfinite(loss)
    assert int((W_new == 0).sum()) == 24


# ---------------------------------------------------------------------------------------------------------------
# the layer-wise driver on tiny models
# ---------------------------------------------------------------------------------------------------------------


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
        and not m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_n_m_masks_valid_on_every_family(family, method):
    model = tiny_model(family)
    biases = {n: m.bias.clone() for n, m in prunable_linears(model).items() if m.bias is not None}
    if family in ("opt", "llama"):
        assert bool(biases) == (family == "opt")  # OPT has biases, Llama none (Qwen2 has them on q/k/v)
    report = prune_model_layerwise(model, tiny_windows(4, 16), method=method, sparsity=0.5, n_m=(2, 4),
                                   batch_size=2)
    assert report["achieved_sparsity"] == 0.5
    for name, linear in prunable_linears(model).items():
        groups = (linear.weight == 0).view(linear.out_features, -1, 4).sum(-1)  # zeros per group of 4 inputs
        assert (groups >= 2).all(), name
        if name in biases:
            assert torch.equal(linear.bias, biases[name])
    assert torch.isfinite(hidden_states(model, tiny_windows(1, 16))).all()


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_exactly_half_per_linear(family, method):
    model = tiny_model(family)
    head = model.get_output_embeddings().weight.clone()
    report = prune_model_layerwise(model, tiny_windows(4, 16), method=method, sparsity=0.5)
    for name, linear in prunable_linears(model).items():
        assert int((linear.weight == 0).sum()) == linear.weight.numel() // 2, name
    assert [layer["sparsity"] for layer in report["layers"]] == [0.5, 0.5]
    assert all(v["sparsity"] == 0.5 for layer in report["layers"] for v in layer["linears"].values())
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert _no_hooks(model)


@pytest.mark.integration
def test_sparsegpt_hessian_does_not_depend_on_batching():
    a, b = tiny_model("llama"), tiny_model("llama")
    windows = tiny_windows(4, 16)
    prune_model_layerwise(a, windows, method="sparsegpt", sparsity=0.5, batch_size=1)
    prune_model_layerwise(b, windows, method="sparsegpt", sparsity=0.5, batch_size=4)
    for (name, la), lb in zip(prunable_linears(a).items(), prunable_linears(b).values()):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_float64_model_is_pruned_in_float64(method):
    # A float64 model keeps float64 statistics and math (exact cross-checks), so batching changes nothing beyond
    # float64 rounding, far below the fp32 tolerance of the test above.
    a, b = tiny_model("llama").double(), tiny_model("llama").double()
    windows = tiny_windows(4, 16)
    prune_model_layerwise(a, windows, method=method, sparsity=0.5, n_m=(2, 4), batch_size=1)
    prune_model_layerwise(b, windows, method=method, sparsity=0.5, n_m=(2, 4), batch_size=4)
    for (name, la), lb in zip(prunable_linears(a).items(), prunable_linears(b).values()):
        assert la.weight.dtype == torch.float64
        assert torch.equal(la.weight != 0, lb.weight != 0), name
        torch.testing.assert_close(la.weight, lb.weight, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_float64_statistics_with_an_fp32_model(method, monkeypatch):
    """stats_dtype=float64 (PruneOptions.baseline_dtype, recipe key baseline_dtype: fp64): the statistics and the
    mask/OBS math run in float64 while the model and its forward passes stay fp32; the default stays fp32."""
    from surgeon.config import load_recipe
    from surgeon_core.shot import PruneOptions
    from tiny_models import prune

    seen = []
    real_wanda, real_sparsegpt = baselines_module.wanda_mask, baselines_module.sparsegpt_prune
    monkeypatch.setattr(baselines_module, "wanda_mask",
                        lambda W, s, *a, **k: seen.append((W.dtype, s.dtype)) or real_wanda(W, s, *a, **k))
    monkeypatch.setattr(baselines_module, "sparsegpt_prune",
                        lambda W, H, *a, **k: seen.append((W.dtype, H.dtype)) or real_sparsegpt(W, H, *a, **k))
    windows = tiny_windows(4, 16)
    models = {}
    for dtype in (None, torch.float64):
        seen.clear()
        models[dtype] = m = tiny_model("llama")
        prune(m, windows, options=PruneOptions(method=method, structure="2:4", baseline_dtype=dtype), target_size=0.5)
        assert seen and set(seen) == {(torch.float32, dtype or torch.float32)}
        assert all(p.dtype == torch.float32 for p in m.parameters())
    for (name, a), b in zip(prunable_linears(models[None]).items(), prunable_linears(models[torch.float64]).values()):
        valid = (b.weight != 0).view(b.weight.shape[0], -1, 4).sum(-1) <= 2
        assert valid.all(), name
        if method == "sparsegpt":  # the OBS updates ran in another precision: close, not the same bits
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-3, atol=1e-4, msg=name)
    if method == "sparsegpt":
        assert any(not torch.equal(a.weight, b.weight) for a, b in
                   zip(prunable_linears(models[None]).values(), prunable_linears(models[torch.float64]).values()))
    recipe = dict(model="x", method=method, structure="2:4")
    assert load_recipe(None, ["baseline_dtype=fp64"], **recipe).options().baseline_dtype == torch.float64
    assert load_recipe(None, [], **recipe).options().baseline_dtype is None
    with pytest.raises(ValueError, match="baseline_dtype"):
        PruneOptions(baseline_dtype=torch.float16)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_driver_layer_outputs_match_full_forward(family):
    model = tiny_model(family)
    windows = tiny_windows(4, 16)
    layers = get_submodule(model, adapter_for(model).layers)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def recorder(i):
        return lambda _m, _args, out: seen[i].append((out[0] if isinstance(out, tuple) else out).clone())

    handles = [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for s in (0, 2):
                hidden_states(model, windows[s : s + 2])
        expected = {i: list(v) for i, v in seen.items()}
        for v in seen.values():
            v.clear()
        run_layerwise(model, windows, prune_layer=lambda i, linears, stats: {}, make_stats=None, batch_size=2,
                      device="cpu", offload_device="cpu")
    finally:
        for h in handles:
            h.remove()
    for i in range(len(layers)):
        # layer 0 also runs while its inputs are captured; then one propagation pass (no stats were asked for)
        assert len(seen[i]) == (4 if i == 0 else 2)
        for got, want in zip(seen[i], expected[i] * 2):
            torch.testing.assert_close(got, want)


@pytest.mark.integration
def test_driver_feeds_pruned_outputs_to_the_next_layer():
    model = tiny_model("llama")
    windows = tiny_windows(2, 16)
    recorded = {}

    def prune_layer(i, linears, stats):
        if i == 0:  # prune layer 0; layer 1 must then see its pruned outputs
            for linear in linears.values():
                linear.weight.mul_(magnitude_mask(linear.weight, 0.5))
        else:
            recorded["sq_norms"] = stats["self_attn.q_proj"].sq_norms.clone()
            assert stats["self_attn.k_proj"] is stats["self_attn.q_proj"]  # one statistic per input group
        return {}

    run_layerwise(model, windows, prune_layer=prune_layer,
                  make_stats=lambda lin: InputStats(lin.in_features, hessian=False, sq_norms=True, device="cpu"))
    q_proj = get_submodule(model, "model.layers.1.self_attn.q_proj")
    inputs = []
    handle = q_proj.register_forward_hook(lambda _m, args, _out: inputs.append(flatten_inputs(args[0])))
    with torch.no_grad():
        hidden_states(model, windows)
    handle.remove()
    torch.testing.assert_close(recorded["sq_norms"], (torch.cat(inputs) ** 2).sum(0))


@pytest.mark.integration
@pytest.mark.parametrize("true_sequential", [False, True])
def test_true_sequential_calibrates_on_the_pruned_earlier_groups(true_sequential):
    """Zeroing q/k/v makes the attention output, o_proj's input, exactly 0: only the true-sequential driver
    (which calibrates o_proj after q/k/v are pruned) sees that; the default sees the dense layer's inputs."""
    model = tiny_model("llama")
    windows = tiny_windows()
    seen: dict[int, set] = {}

    def prune_layer(i, linears, stats):
        seen.setdefault(i, set()).update(linears)
        if i == 0:
            for name, linear in linears.items():
                if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    linear.weight.zero_()
            if "self_attn.o_proj" in stats:
                seen["o_norms"] = stats["self_attn.o_proj"].sq_norms.clone()
        return {"linears": {name: {} for name in linears}}

    reports = run_layerwise(model, windows, prune_layer=prune_layer, true_sequential=true_sequential,
                            make_stats=lambda lin: InputStats(lin.in_features, hessian=False, sq_norms=True,
                                                              device="cpu"))
    adapter = adapter_for(model)
    assert seen[0] == set(adapter.linears) and set(reports[0]["linears"]) == set(adapter.linears)
    if true_sequential:
        assert float(seen["o_norms"].abs().sum()) == 0.0
    else:
        assert float(seen["o_norms"].sum()) > 0.0


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_driver_leaves_no_hooks_even_when_the_callback_raises(family):
    model = tiny_model(family)
    layers_before = get_submodule(model, adapter_for(model).layers)
    assert _no_hooks(model)

    def boom(i, linears, stats):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        run_layerwise(model, tiny_windows(2, 16), prune_layer=boom,
                      make_stats=lambda lin: InputStats(lin.in_features, hessian=True, sq_norms=False, device="cpu"))
    assert _no_hooks(model)
    assert get_submodule(model, adapter_for(model).layers) is layers_before and len(layers_before) == 2
    assert not model.training  # the eval/train state is restored


def test_prune_model_layerwise_rejects_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        prune_model_layerwise(model, tiny_windows(2, 8), method="random", sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        prune_model_layerwise(model, tiny_windows(2, 8), method="wanda", sparsity=1.5)
    with pytest.raises(ValueError, match="divisible"):
        prune_model_layerwise(model, None, method="magnitude", sparsity=2 / 7, n_m=(5, 7))
    with pytest.raises(ValueError, match="windows"):
        prune_model_layerwise(model, None, method="sparsegpt", sparsity=0.5)


@pytest.mark.heavy
def test_modules_are_pure_torch():
    code = ("import sys, surgeon_core.baselines, surgeon_core.sequential; "
            "bad = {'transformers', 'datasets', 'prefect', 'mlflow'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
