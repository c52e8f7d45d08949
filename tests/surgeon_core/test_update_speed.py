"""The row-factored, batched element update (surgeon_core.update) equals the readable one of surgeon_core.reference."""

import pytest
import torch

from surgeon_core.reference import correlated_element_update, row_chunks
from surgeon_core.update import _row_chunks, _update_elements, obs_update_elements, obs_update_elements_batched


def _obs_update_elements_reference(W, drop, G_inv, A_inv, *, max_correlate):
    """The reference update of every layer of a batch, one after another."""
    return torch.stack([correlated_element_update(W[b], drop[b], G_inv[b], A_inv[b], max_correlate)
                        for b in range(W.shape[0])])


def _row_chunks_reference(counts: torch.Tensor, max_correlate: int) -> torch.Tensor:
    """Chunk id of every row (-1: no removals) from the reference's packing."""
    chunk_of = torch.full((counts.numel(),), -1, dtype=torch.long)
    for i, rows in enumerate(row_chunks(counts.tolist(), max_correlate)):
        chunk_of[rows] = i
    return chunk_of


def _spd_inv(n: int, B: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    X = torch.randn(B, n, 2 * n, generator=g, dtype=torch.float64)
    return torch.linalg.inv(X @ X.mT / (2 * n) + 0.05 * torch.eye(n, dtype=torch.float64)).to(dtype)


def _nm_drop(B: int, R: int, C: int, g: torch.Generator, n: int = 2, m: int = 4) -> torch.Tensor:
    scores = torch.rand(B, R, C // m, m, generator=g)
    idx = scores.argsort(-1)[..., :n]
    return torch.zeros(B, R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).view(B, R, C)


def _problem(seed: int, B: int, R: int, C: int, bias: bool, dtype=torch.float32, kind: str = "random"):
    g = torch.Generator().manual_seed(seed)
    Cp = C + int(bias)
    W = torch.randn(B, R, Cp, generator=g, dtype=torch.float64).to(dtype)
    G_inv, A_inv = _spd_inv(R, B, g, dtype), _spd_inv(Cp, B, g, dtype)
    if kind == "nm":
        drop = _nm_drop(B, R, C, g)
    else:  # a different density per layer, so the layers have different chunk counts
        frac = torch.linspace(0.1, 0.6, B)[:, None, None]
        drop = torch.rand(B, R, C, generator=g) < frac
    drop[:, 1] = False  # a row with no removals
    drop[0, 2] = True  # a whole row: more removals than max_correlate below
    drop[-1, -1, : C // 2] = True
    return W, drop, G_inv, A_inv


def _check(new, ref, W, drop):
    C = drop.shape[2]
    assert (new[:, :, :C][drop] == 0).all()
    assert torch.equal(new[:, :, :C][drop], ref[:, :, :C][drop])
    tol = 1e-10 if W.dtype == torch.float64 else 2e-5
    assert (new - ref).abs().max() <= tol * W.abs().max()


@pytest.mark.parametrize("kind", ["random", "nm"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("max_correlate", [0, 9, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_factored_update_equals_reference(kind, bias, max_correlate, dtype):
    seed = 100 * int(bias) + max_correlate + (7 if kind == "nm" else 0)
    W, drop, G_inv, A_inv = _problem(seed, B=4, R=24, C=20, bias=bias, dtype=dtype, kind=kind)
    new = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=max_correlate)
    ref = _obs_update_elements_reference(W, drop, G_inv, A_inv, max_correlate=max_correlate)
    _check(new, ref, W, drop)
    # the inputs are left alone and every layer equals its own single-layer update
    for b in range(W.shape[0]):
        one = obs_update_elements(W[b], drop[b], G_inv[b], A_inv[b], max_correlate=max_correlate)
        assert (one - new[b]).abs().max() <= (1e-10 if dtype == torch.float64 else 2e-5) * W.abs().max()


def test_layers_without_removals_and_empty_batches():
    W, drop, G_inv, A_inv = _problem(5, B=3, R=10, C=12, bias=True)
    drop[1] = False
    new = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=8)
    _check(new, _obs_update_elements_reference(W, drop, G_inv, A_inv, max_correlate=8), W, drop)
    assert torch.equal(new[1], W[1])
    none = torch.zeros_like(drop)
    assert torch.equal(obs_update_elements_batched(W, none, G_inv, A_inv), W)


def test_failed_cholesky_is_redone_alone_with_jitter():
    W, drop, G_inv, A_inv = _problem(7, B=3, R=12, C=10, bias=False, dtype=torch.float64)
    G_inv[1, 0, :] = 0  # row 0 of layer 1 has no curvature information: its OBS blocks are singular
    G_inv[1, :, 0] = 0
    drop[1, 0, :3] = True
    new = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=6)
    assert torch.isfinite(new).all() and (new[:, :, :10][drop] == 0).all()
    for b in range(3):  # a failed layer is redone alone with the damped solve: as if solved alone from the start
        alone = _update_elements(W[b : b + 1], drop[b : b + 1], G_inv[b : b + 1], A_inv[b : b + 1], max_correlate=6,
                                 strict=True)[0]
        assert (new[b] - alone).abs().max() <= 1e-8 * W.abs().max()


def test_row_chunks_match_the_greedy_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 30, (1,), generator=g))
        counts = torch.randint(0, 12, (n,), generator=g) * (torch.rand(n, generator=g) < 0.6)
        mc = int(torch.randint(0, 15, (1,), generator=g))
        assert torch.equal(_row_chunks(counts, mc), _row_chunks_reference(counts, mc))
    assert _row_chunks(torch.zeros(4, dtype=torch.long), 3).tolist() == [-1] * 4


def test_triangular_cholesky_solve_equals_torch():
    from surgeon_core.linalg import cholesky_solve

    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    C = X @ X.mT / 40 + 0.1 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(3, 40, 2, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(C)
    x = cholesky_solve(b, L)
    assert (x - torch.cholesky_solve(b, L)).abs().max() < 1e-10
    assert (C @ x - b).abs().max() < 1e-10


def test_concurrent_batches_equal_one_after_another():
    from surgeon_core.update import obs_update_elements_concurrent

    problems = [_problem(20, B=3, R=24, C=20, bias=True), _problem(21, B=2, R=10, C=12, bias=False),
                _problem(22, B=4, R=16, C=8, bias=True, kind="nm")]
    problems[1][1][:] = False  # a batch with nothing to remove finishes at once
    together = obs_update_elements_concurrent(problems, max_correlate=30)
    for p, W in zip(problems, together):
        assert torch.equal(W, obs_update_elements_batched(*p, max_correlate=30))
    assert obs_update_elements_concurrent([]) == []


def _spd_with_condition(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    C = (U * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ U.T
    return (C + C.T) / 2


@pytest.mark.parametrize("cond", [1e2, 1e4])
def test_float32_factorization_refines_to_float64_accuracy(cond):
    from surgeon_core.update import _factor_solve

    C = torch.stack([_spd_with_condition(80, cond, s) for s in range(3)])
    b = torch.randn(3, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = torch.linalg.solve(C, b)
    x, info = _factor_solve(C, b, torch.float32)
    assert x.dtype == torch.float64 and (info == 0).all()
    unrefined = torch.cholesky_solve(b.float()[..., None], torch.linalg.cholesky(C.float())).squeeze(-1).double()
    err = ((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max()
    assert err < 1e-11 and err < 1e-3 * ((unrefined - exact).norm(dim=-1) / exact.norm(dim=-1)).max()


def test_float32_factorization_flags_what_refinement_cannot_fix():
    from surgeon_core.update import _factor_solve

    C = torch.stack([_spd_with_condition(60, 1e2, 0), _spd_with_condition(60, 1e12, 1)])
    C[1] -= 1e-11 * torch.eye(60, dtype=torch.float64)  # still positive definite in float64, not in float32
    x, info = _factor_solve(C, torch.ones(2, 60, dtype=torch.float64), torch.float32)
    assert info[0] == 0 and info[1] != 0


@pytest.mark.parametrize("kind", ["random", "nm"])
def test_float32_solves_give_the_float64_update(kind):
    W, drop, G_inv, A_inv = _problem(30, B=3, R=24, C=20, bias=True, kind=kind)
    exact = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=30)
    fast = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=30, solve_dtype=torch.float32)
    _check(fast, exact, W, drop)


def test_ill_conditioned_layer_falls_back_to_float64():
    W, drop, G_inv, A_inv = _problem(31, B=2, R=12, C=10, bias=False, dtype=torch.float64)
    A = _spd_with_condition(10, 1e13, 2)
    A_inv[1] = torch.linalg.inv(A)  # float32 cannot factorize its blocks; float64 can
    exact = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=6)
    fast = obs_update_elements_batched(W, drop, G_inv, A_inv, max_correlate=6, solve_dtype=torch.float32)
    assert torch.isfinite(fast).all() and (fast[:, :, :10][drop] == 0).all()
    assert (fast[0] - exact[0]).abs().max() <= 1e-8 * W.abs().max()
    alone = _update_elements(W[1:], drop[1:], G_inv[1:], A_inv[1:], max_correlate=6, strict=True)[0]
    assert torch.equal(fast[1], alone)
