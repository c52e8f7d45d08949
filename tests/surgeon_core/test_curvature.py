"""K-FAC factor accumulation on the CPU: the upper-triangle Gram and the vocabulary head's single-chunk loss."""

import pytest
import torch

import surgeon_core.curvature as curvature
import surgeon_core.lm as lm
from surgeon_core.adapters import adapter_for
from surgeon_core.curvature import (accumulate_input_factor, accumulate_output_factor, estimate_kfac,
                                    symmetrize_upper_)
from tiny_models import tiny_model, tiny_windows


def _batches(D: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(D)
    scale = torch.rand(D, generator=g) * 3  # columns of different sizes, as in real activations
    return [torch.randn(2, 50, D, generator=g) * scale for _ in range(n)]


def test_gram_is_split_only_where_it_pays():
    cpu = torch.device("cpu")
    assert curvature._gram_blocks(cpu, None, 383) == 1
    assert curvature._gram_blocks(cpu, None, 384) == 2
    assert curvature._gram_blocks(cpu, torch.float32, 1536) == 4
    assert curvature._gram_blocks(cpu, torch.bfloat16, 1536) == 1  # the bf16 path is unchanged
    assert curvature._gram_blocks(torch.device("cuda"), None, 1536) == 1


@pytest.mark.parametrize("D", [100, 384, 577, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_upper_triangle_input_factor_equals_the_full_gram(D, bias):
    batches = _batches(D)

    def augmented(x):
        a = x.reshape(-1, D).double()
        return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a

    ref = sum(augmented(x).T @ augmented(x) for x in batches)
    upper = full = None
    for x in batches:
        upper = accumulate_input_factor(upper, x, bias=bias, upper_only=True)
        full = accumulate_input_factor(full, x, bias=bias)
    if D >= 384:  # only the upper block triangle was written: the blocks below it are still zero
        assert float(upper[-1, 0]) == 0.0
    symmetrize_upper_(upper)
    assert upper.dtype == torch.float32 and upper.shape == (D + bias, D + bias)
    assert torch.equal(upper, upper.T)
    assert torch.allclose(upper.double(), ref, rtol=1e-5, atol=1e-3)
    assert torch.allclose(upper, full, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("D", [192, 1000])
def test_upper_triangle_output_factor_equals_the_full_gram(D):
    batches = _batches(D)
    ref = sum(x.reshape(-1, D).double().T @ x.reshape(-1, D).double() for x in batches)
    G = None
    for x in batches:
        G = accumulate_output_factor(G, x, upper_only=True)
    symmetrize_upper_(G)
    assert torch.equal(G, G.T)
    assert torch.allclose(G.double(), ref, rtol=1e-5, atol=1e-3)


def test_estimated_factors_are_symmetric_and_match_one_full_matmul(monkeypatch):
    """A tiny Llama whose FFN is 400 wide, so the down_proj input and the gate/up output factors are split."""
    model, windows = tiny_model("llama", intermediate_size=400), tiny_windows(4, 16)
    adapter = adapter_for(model)
    split = estimate_kfac(model, windows, adapter=adapter, batch_size=2)
    monkeypatch.setattr(curvature, "_gram_blocks", lambda device, dtype, D: 1)
    whole = estimate_kfac(model, windows, adapter=adapter, batch_size=2)
    assert split.A.keys() == whole.A.keys() and split.G.keys() == whole.G.keys()
    sides = {M.shape[0] for M in [*split.A.values(), *split.G.values()]}
    assert 400 in sides
    for M, R in [*zip(split.A.values(), whole.A.values()), *zip(split.G.values(), whole.G.values())]:
        assert torch.equal(M, M.T)
        assert torch.allclose(M, R, rtol=1e-5, atol=1e-8)


def test_single_chunk_loss_skips_the_recompute_and_gives_the_same_gradients(monkeypatch):
    model, windows = tiny_model("llama"), tiny_windows(2, 16)
    calls = []
    real = lm.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "checkpoint", counting)
    emb = model.get_input_embeddings()
    results = {}
    for chunk in (8, 4096):  # 4 chunks of 2 x 4 tokens, then all 30 tokens at once
        calls.clear()
        model.zero_grad()
        loss = lm.sequence_nll(model, windows, chunk_tokens=chunk)
        loss.sum().backward()
        results[chunk] = (loss.detach(), emb.weight.grad.clone(), len(calls))
    assert results[8][2] == 4 and results[4096][2] == 0
    assert torch.allclose(results[8][0], results[4096][0], rtol=1e-6)
    scale = float(results[8][1].abs().max())
    assert scale > 0 and float((results[8][1] - results[4096][1]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_softmax_nll_is_cross_entropy_bit_for_bit(dtype):
    """The loss pass's blocked NLL: the values of F.cross_entropy on fp32 (float64) logits and, for a summed loss
    (the curvature pass), the very same gradient, in every dtype; a weighted loss gets it to one rounding."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 700, generator=g, dtype=torch.float64) * 6).to(dtype)  # more rows than one block
    targets = torch.randint(0, 700, (300,), generator=g)
    weights = torch.rand(300, generator=g, dtype=torch.float64)
    for weighted in (False, True):
        out = {}
        for name in ("fused", "reference"):
            x = logits.clone().requires_grad_()
            if name == "fused":
                nll = lm._SoftmaxNLL.apply(x, targets)
            else:
                nll = torch.nn.functional.cross_entropy(x if dtype == torch.float64 else x.float(), targets,
                                                        reduction="none")
            (nll * weights.to(nll.dtype) if weighted else nll).sum().backward()
            out[name] = (nll.detach(), x.grad)
            assert torch.equal(x.detach(), logits)  # the logits are not modified in place
        assert torch.equal(out["fused"][0], out["reference"][0])
        if not weighted:
            assert torch.equal(out["fused"][1], out["reference"][1])
        else:
            diff = (out["fused"][1].double() - out["reference"][1].double()).abs().max()
            assert diff <= {torch.float64: 1e-15, torch.float32: 1e-7, torch.bfloat16: 2 ** -8}[dtype]


def test_softmax_nll_gradcheck():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 6, 2, 2])
    assert torch.autograd.gradcheck(lambda v: lm._SoftmaxNLL.apply(v, t), (x,))


@pytest.mark.parametrize("arch,fisher", [("llama", "empirical"), ("opt", "empirical"), ("llama", "sampled")])
def test_layer_block_passes_give_the_same_factors(arch, fisher):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    windows = tiny_windows(4, 16)
    seen = []
    kw = dict(collect_weight_grads=True) if fisher == "empirical" else dict(fisher="sampled", fisher_samples=2)
    one = estimate_kfac(model, windows, adapter=adapter, batch_size=2, **kw)
    split = estimate_kfac(model, windows, adapter=adapter, batch_size=2, passes=2,
                          progress=lambda i, n: seen.append((i, n)), **kw)
    assert seen[-1] == (8, 8) and len(seen) == 4  # one count across both passes
    for kind in ("A", "G") + (("grads",) if fisher == "empirical" else ()):
        mine, theirs = getattr(one, kind), getattr(split, kind)
        assert mine.keys() == theirs.keys() and mine
        for key in mine:  # the same matmuls on the same inputs: bit for bit
            assert torch.equal(mine[key], theirs[key]), (kind, key)
    assert split.tokens == one.tokens and split.group_of == one.group_of


def test_layer_blocks_are_contiguous_balanced_and_never_empty():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    n = len(curvature.get_submodule(model, adapter.layers))
    assert curvature.layer_blocks(model, adapter, 1) == [list(range(n))]
    blocks = curvature.layer_blocks(model, adapter, 2)
    assert [i for b in blocks for i in b] == list(range(n)) and len(blocks) == 2 and all(blocks)
    assert [i for b in curvature.layer_blocks(model, adapter, n + 3) for i in b] == list(range(n))
    with pytest.raises(ValueError, match="passes"):
        estimate_kfac(model, tiny_windows(2, 8), adapter=adapter, passes=0)


def test_stored_factors_read_back_as_the_fp32_ones(monkeypatch):
    monkeypatch.setattr(curvature, "PACK_BLOCK", 5)  # several column blocks in the tiny factors
    model = tiny_model("opt")  # biases: factors of odd sizes
    adapter = adapter_for(model)
    windows = tiny_windows(4, 16)
    f32 = estimate_kfac(model, windows, adapter=adapter, batch_size=2)
    packed = estimate_kfac(model, windows, adapter=adapter, batch_size=2, storage="packed", passes=2)
    bf = estimate_kfac(model, windows, adapter=adapter, batch_size=2, storage="bf16")
    for name in f32.G:
        A, G = f32.input_factor(name), f32.output_factor(name)
        assert torch.equal(packed.input_factor(name), A) and torch.equal(packed.output_factor(name), G)
        assert torch.equal(bf.input_factor(name), A.bfloat16().float())
        assert torch.equal(bf.output_factor(name), G.bfloat16().float())
    n = f32.a_sizes[next(iter(f32.A))]
    assert packed.A[next(iter(f32.A))].numel() < 0.75 * n * n
    with pytest.raises(ValueError, match="storage"):
        estimate_kfac(model, windows, adapter=adapter, storage="fp16")


@pytest.mark.parametrize("n", [1, 4, 5, 6, 13])
def test_packing_a_symmetric_matrix_round_trips(monkeypatch, n):
    monkeypatch.setattr(curvature, "PACK_BLOCK", 5)
    X = torch.randn(n, n + 2)
    M = X @ X.T
    v = curvature.pack_symmetric(M)
    assert v.dim() == 1 and v.numel() == sum(e * (e - s) for s, e in curvature._pack_blocks(n))
    assert torch.equal(curvature.unpack_symmetric(v, n), M)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_factor_memory_counts_the_bytes_a_pass_keeps(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    windows = tiny_windows(2, 8)
    for passes, storage in ((1, "fp32"), (2, "bf16"), (2, "packed")):
        f = estimate_kfac(model, windows, adapter=adapter, passes=passes, storage=storage)
        held = sum(M.numel() * M.element_size() for d in (f.A, f.G) for M in d.values())
        plan = curvature.factor_memory(model, adapter, passes=passes, storage=storage)
        assert plan["stored"] == held
        fp32 = sum(M.numel() * 4 for d in (f.A, f.G) for M in d.values())
        if passes == 1:
            assert plan["peak"] == fp32
        elif storage == "bf16":  # one block's fp32 sums beside the other block's bf16 factors
            assert plan["stored"] < plan["peak"] < fp32
    one = curvature.factor_memory(model, adapter)
    split = curvature.factor_memory(model, adapter, passes=2, storage="bf16")
    assert split["peak"] < one["peak"] and split["stored"] * 2 == one["stored"]
    shared = curvature.factor_memory(model, adapter, world=2, shard=True)
    assert one["stored"] / 2 <= shared["stored"] < one["stored"] and shared["peak"] == one["peak"]
