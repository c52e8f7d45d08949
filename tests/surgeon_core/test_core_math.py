"""Hand-checkable tests of the LLM Surgeon math on single linears."""

import pytest
import torch

from surgeon_core.allocation import select_elements, select_groups, select_structures, structured_removed
from surgeon_core.costs import column_costs, element_costs, nm_groups, row_costs
from surgeon_core.linalg import damped_inverse
from surgeon_core.update import obs_update_columns, obs_update_elements, obs_update_rows, quadratic_loss

pytestmark = pytest.mark.unit


def spd(n, seed, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (Q * s) @ Q.T


def test_identity_factors_reduce_every_cost_to_magnitude():
    W = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -0.7]])
    I2, I3 = torch.eye(2), torch.eye(3)
    # with A = G = I (no damping) the OBS element cost is ½ W²
    Ainv, _ = damped_inverse(I3, 0.0)
    Ginv, _ = damped_inverse(I2, 0.0)
    torch.testing.assert_close(element_costs(W, kind="obs", A_inv=Ainv, G_inv=Ginv), 0.5 * W**2)
    torch.testing.assert_close(element_costs(W, kind="kfac-diag", A=I3, G=I2), 0.5 * W**2)
    # rows: ½‖w_r‖², columns: ½‖w_c‖²
    torch.testing.assert_close(row_costs(W, kind="obs", A=I3, G=I2, G_inv=Ginv), 0.5 * (W**2).sum(1))
    torch.testing.assert_close(column_costs(W, kind="obs", A=I3, G=I2, A_inv=Ainv), 0.5 * (W**2).sum(0))
    # so the cheapest element, row and column are exactly the smallest by magnitude
    masks = select_elements([element_costs(W, kind="obs", A_inv=Ainv, G_inv=Ginv)], 2)
    assert masks[0].tolist() == [[False, False, False], [True, False, True]]


def test_kronecker_inverse_identity():
    A, G = spd(4, 0), spd(3, 1)
    lhs = torch.linalg.inv(torch.kron(G, A))
    rhs = torch.kron(torch.linalg.inv(G), torch.linalg.inv(A))
    torch.testing.assert_close(lhs, rhs)
    # and the damped inverse matches the dense inverse of the damped matrix
    Ainv, used = damped_inverse(A.float(), 0.1)
    ref = torch.linalg.inv(A + 0.1 * torch.diagonal(A).mean() * torch.eye(4, dtype=A.dtype))
    assert used == 0.1
    torch.testing.assert_close(Ainv.double(), ref, rtol=1e-5, atol=1e-6)


def _obs_setup(R=5, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g, dtype=torch.float64)
    A, G = spd(C, seed + 1, 50.0), spd(R, seed + 2, 50.0)
    return W, A, G, torch.linalg.inv(A), torch.linalg.inv(G)


@pytest.mark.parametrize("seed", range(5))
def test_obs_element_update_never_worse_than_zeroing(seed):
    W, A, G, Ainv, Ginv = _obs_setup(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    drop = torch.rand(W.shape, generator=g) < 0.4
    W_obs = obs_update_elements(W, drop, Ginv, Ainv, max_correlate=0)
    W_zero = W.clone()
    W_zero[drop] = 0
    assert (W_obs[drop] == 0).all()
    loss_obs = quadratic_loss(W_obs - W, A, G)
    loss_zero = quadratic_loss(W_zero - W, A, G)
    assert loss_obs <= loss_zero + 1e-9
    # the all-correlations update is the exact constrained optimum: the cost formula for a single element holds
    single = torch.zeros_like(drop)
    single[1, 2] = True
    W1 = obs_update_elements(W, single, Ginv, Ainv, max_correlate=0)
    expected = element_costs(W, kind="obs", A_inv=Ainv, G_inv=Ginv)[1, 2]
    torch.testing.assert_close(quadratic_loss(W1 - W, A, G), expected)


def test_chunked_element_update_zeroes_and_beats_zeroing():
    W, A, G, Ainv, Ginv = _obs_setup(R=8, C=8, seed=3)
    drop = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    W_chunked = obs_update_elements(W, drop, Ginv, Ainv, max_correlate=5)
    W_zero = W.clone()
    W_zero[drop] = 0
    assert (W_chunked[drop] == 0).all()
    assert quadratic_loss(W_chunked - W, A, G) <= quadratic_loss(W_zero - W, A, G)


def test_row_and_column_updates_match_their_costs():
    W, A, G, Ainv, Ginv = _obs_setup(seed=7)
    r = torch.tensor([2])
    W_r = obs_update_rows(W, Ginv, r)
    assert (W_r[2] == 0).all()
    torch.testing.assert_close(quadratic_loss(W_r - W, A, G), row_costs(W, kind="obs", A=A, G=G, G_inv=Ginv)[2])
    c = torch.tensor([4])
    W_c = obs_update_columns(W, Ainv, c)
    assert (W_c[:, 4] == 0).all()
    torch.testing.assert_close(quadratic_loss(W_c - W, A, G), column_costs(W, kind="obs", A=A, G=G, A_inv=Ainv)[4])
    # joint removal of several rows is no worse than zeroing them
    rows = torch.tensor([0, 3])
    W_j = obs_update_rows(W, Ginv, rows)
    W_z = W.clone()
    W_z[rows] = 0
    assert quadratic_loss(W_j - W, A, G) <= quadratic_loss(W_z - W, A, G)


def test_nm_groups_are_valid_and_pick_cheapest():
    costs = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 9.0, 8.0]])
    group_costs, drop = nm_groups(costs, 2, 4)
    assert drop.tolist() == [[False, True, False, True, True, True, False, False]]
    torch.testing.assert_close(group_costs, torch.tensor([[3.0, 0.6]]))
    with pytest.raises(ValueError, match="divisible"):
        nm_groups(torch.ones(2, 6), 2, 4)
    big = torch.rand(16, 64)
    _, d = nm_groups(big, 4, 8)
    assert (d.view(16, 8, 8).sum(-1) == 4).all()


def test_global_element_selection_is_exact_with_ties():
    a = torch.tensor([1.0, 1.0, 1.0, 2.0])
    b = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    masks = select_elements([a, b], 3)
    assert sum(int(m.sum()) for m in masks) == 3
    assert bool(masks[1][0, 1])  # the zero-cost entry always goes first
    g = select_groups([torch.tensor([[0.3, 0.1]]), torch.tensor([[0.2]])], 2)
    assert g[0].tolist() == [[False, True]] and g[1].tolist() == [[True]]


def _sorted_lowest(costs, k):
    """Reference: the k lowest by a stable sort of all costs laid end to end (layer order, then memory order)."""
    flat = torch.cat([c.reshape(-1) for c in costs])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, stable=True).indices[: max(0, min(k, flat.numel()))]] = True
    return list(torch.split(chosen, [c.numel() for c in costs]))


@pytest.mark.parametrize("kind", ["normal", "ties", "tiny", "removed"])
def test_global_selection_matches_a_stable_sort(kind):
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        costs = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            shape = tuple(int(x) for x in torch.randint(1, 9, (2,), generator=g))
            if kind == "normal":  # negative costs happen with the first-order term
                c = torch.randn(shape, generator=g)
            elif kind == "ties":
                c = torch.randint(-3, 4, shape, generator=g).float() * 0.5
            elif kind == "tiny":  # differ only in the low mantissa bits / exponents
                c = torch.rand(shape, generator=g) * 1e-30
            else:  # −inf marks entries removed by an earlier shot
                c = torch.randint(0, 3, shape, generator=g).float()
                c[c == 2] = float("-inf")
            costs.append(c)
        total = sum(c.numel() for c in costs)
        for k in (0, 1, total // 3, total - 1, total, total + 5):
            got = select_elements(costs, k)
            want = _sorted_lowest(costs, k)
            assert all(torch.equal(m.reshape(-1), w) for m, w in zip(got, want))


def test_global_selection_rejects_nan_costs():
    with pytest.raises(ValueError, match="NaN"):
        select_elements([torch.tensor([1.0, float("nan")])], 1)


def test_structured_threshold_accounting():
    assert structured_removed(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(10.0), torch.tensor(8.0)) == 2 * 8 + 3 * 10 - 6
    # layer 1: 4x4, layer 2: 2x8 (rows have 8 params, columns 2)
    rows = [torch.tensor([0.1, 5.0, 5.0, 5.0]), torch.tensor([0.3, 9.0])]
    cols = [torch.tensor([0.2, 5.0, 5.0, 5.0]), torch.tensor([0.05] + [9.0] * 7)]
    r, c = select_structures(rows, cols, n_remove=9)
    # τ = 0.2: row 0 + col 0 of layer 1 (4 + 4 - 1 = 7) and col 0 of layer 2 (2) = 9; adding 0.3 (row, 8) overflows
    assert r[0].tolist() == [True, False, False, False] and c[0].tolist() == [True, False, False, False]
    assert r[1].tolist() == [False, False] and c[1][0] and c[1].sum() == 1
    # dead structures (cost -inf) are always removed
    r, c = select_structures([torch.tensor([float("-inf"), 1.0])], [torch.tensor([1.0, 1.0])], n_remove=0)
    assert r[0].tolist() == [True, False]


def test_damped_inverse_escalates_on_indefinite_factor():
    M = torch.zeros(4, 4)
    M[0, 0] = 1.0  # zero rows: positive semi-definite only
    inv, used = damped_inverse(M, 0.0)
    assert used > 0 and torch.isfinite(inv).all()
    with pytest.raises(FloatingPointError):
        damped_inverse(torch.full((3, 3), float("nan")), 0.01)


def test_batched_element_update_equals_one_layer_at_a_time():
    from surgeon_core.update import obs_update_elements_batched

    layers = [_obs_setup(R=6, C=8, seed=s) for s in range(3)]
    drops = [torch.rand(6, 8, generator=torch.Generator().manual_seed(10 + s)) < 0.5 for s in range(3)]
    batched = obs_update_elements_batched(torch.stack([l[0] for l in layers]), torch.stack(drops),
                                          torch.stack([l[4] for l in layers]), torch.stack([l[3] for l in layers]),
                                          max_correlate=7)
    for (W, A, G, Ainv, Ginv), d, Wb in zip(layers, drops, batched):
        torch.testing.assert_close(Wb, obs_update_elements(W, d, Ginv, Ainv, max_correlate=7))
        assert (Wb[d] == 0).all()


def test_float32_inverse_option_is_close_and_validated(monkeypatch):
    """inverse_dtype=float32: the same damped inverse to fp32 accuracy on a well-conditioned factor (the float64
    default is the reference's), computed in float32 (not bit-equal), and the shot's inverses use it; anything else
    is refused; the recipe key reaches the options and the weight hash."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 60, generator=g) * torch.rand(60, generator=g) * 3
    M = x.T @ x
    inv64, used64 = damped_inverse(M, 0.01)
    inv32, used32 = damped_inverse(M, 0.01, dtype=torch.float32)
    assert used64 == used32 == 0.01 and inv32.dtype == inv64.dtype == torch.float32
    assert float((inv32 - inv64).abs().max() / inv64.abs().max()) < 1e-4
    assert not torch.equal(inv32, inv64)  # the float32 Cholesky really ran (an ignored dtype gives inv64 exactly)
    import surgeon_core.subproblem as subproblem
    from surgeon_core.shot import PruneOptions, prune_shot
    from tiny_models import tiny_model, tiny_windows

    for dtype in (torch.float32, torch.float64):  # the option reaches every inverse of a shot
        calls = []

        def spy(M, frac, *, dtype=torch.float64, _calls=calls, **kw):
            _calls.append(dtype)
            return damped_inverse(M, frac, dtype=dtype, **kw)

        monkeypatch.setattr(subproblem, "damped_inverse", spy)
        prune_shot(tiny_model("llama"), tiny_windows(2, 16), options=PruneOptions(inverse_dtype=dtype),
                   target_size=0.8)
        assert calls and set(calls) == {dtype}
    monkeypatch.undo()

    assert PruneOptions(inverse_dtype=torch.float32).to_dict()["inverse_dtype"] == "float32"
    with pytest.raises(ValueError, match="inverse_dtype"):
        PruneOptions(inverse_dtype=torch.float16)
    from surgeon.config import load_recipe

    base = load_recipe(None, [], model="x")
    fast = load_recipe(None, ["inverse_dtype=fp32"], model="x")
    assert fast.options().inverse_dtype == torch.float32
    assert base.options().inverse_dtype == torch.float64
    assert fast.config_hash() != base.config_hash()
