"""The one damping policy (surgeon_core.linalg): λ = the caller's fraction, ×10 (from 1e-8) after a failed Cholesky,
up to 1e4; every damped inverse and solve of surgeon_core goes through it."""

import pytest
import torch

from surgeon_core import linalg

pytestmark = pytest.mark.unit


def _spd(n: int, seed: int, batch: tuple = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, 2 * n, generator=g, dtype=torch.float64)
    return X @ X.mT / (2 * n)


def test_escalation_sequence_and_limit():
    tried = []

    def never(damped):
        tried.append(float(damped[0, 0] - 1.0))  # M = I: the damping added to the diagonal
        return None

    with pytest.raises(FloatingPointError, match="damping up to 10000"):
        linalg.escalate(torch.eye(2, dtype=torch.float64), 0.0, never)
    assert tried == pytest.approx([0.0] + [10.0 ** e for e in range(-8, 5)], rel=1e-6)
    tried.clear()
    with pytest.raises(FloatingPointError):
        linalg.escalate(torch.eye(2, dtype=torch.float64), 0.01, never)
    assert tried == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4], rel=1e-6)


def test_damping_in_place_equals_a_fresh_copy():
    M = _spd(5, 0)
    M[4, 4] = -1.0  # indefinite: needs escalation
    seen = {}

    def first_success(tag):
        def factorize(damped):
            if int(torch.linalg.cholesky_ex(damped)[1]) == 0:
                seen[tag] = damped.clone()
                return True
            return None
        return factorize

    _, used = linalg.escalate(M.clone(), 0.0, first_success("fresh"))
    work = M.clone()
    _, used_inplace = linalg.escalate(work, 0.0, first_success("inplace"), overwrite=True)
    assert used == used_inplace > 0
    torch.testing.assert_close(seen["fresh"], seen["inplace"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(work, seen["inplace"])  # M itself holds the damping that worked


def test_damped_inverse_and_sparsegpt_factor():
    M = _spd(6, 1)
    inv, used = linalg.damped_inverse(M, 0.05)
    assert used == 0.05 and inv.dtype == torch.float32
    torch.testing.assert_close(inv.double(), torch.linalg.inv(linalg.damp(M, 0.05)), rtol=1e-5, atol=1e-6)
    U = linalg.damped_inverse_cholesky(M.clone(), 0.05)
    torch.testing.assert_close(U.mT @ U, torch.linalg.inv(linalg.damp(M, 0.05)), rtol=1e-10, atol=1e-10)
    assert torch.equal(U, U.triu())


def test_solve_spd_plain_batched_and_singular():
    C, b = _spd(7, 2), torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(linalg.solve_spd(C, b), torch.linalg.solve(C, b))
    torch.testing.assert_close(linalg.solve_spd(C, b[:, 0]), torch.linalg.solve(C, b[:, 0]))
    Cb = _spd(5, 3, (4,))
    rhs = torch.randn(4, 5, dtype=torch.float64)
    x = linalg.solve_spd(Cb, rhs, triangular=True)
    torch.testing.assert_close(x, torch.linalg.solve(Cb, rhs))
    singular = torch.zeros(3, 3, dtype=torch.float64)
    singular[0, 0] = 1.0
    assert torch.isfinite(linalg.solve_spd(singular, torch.ones(3, dtype=torch.float64))).all()
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        linalg.solve_spd(torch.full((2, 2), float("nan")), torch.ones(2))


def test_positive_definite_check():
    M = torch.diag(torch.tensor([1.0, 1.0, -0.05]))
    assert not linalg.is_positive_definite(M, 0.0)
    assert linalg.is_positive_definite(M, 0.1)  # 0.1 · mean(diag) = 0.065 > 0.05
