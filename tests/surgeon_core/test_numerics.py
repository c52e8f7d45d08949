"""Numerics under stress: damping escalation for factors that are not positive definite (logged, never NaN/Inf
weights), and calibration overflow under fp16/bf16 and bf16-rounded factors (detected before any weight changes).
The runner's rerun of such a shot in fp32: tests/surgeon/test_runner_fallback.py."""

from __future__ import annotations

import pytest
import torch

from surgeon_core.linalg import damped_inverse
from surgeon_core.shot import NonFiniteCurvatureError, PruneOptions, prune_shot
from tiny_models import overflowing_model, rank_deficient_setup, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def _residual(M: torch.Tensor, inv: torch.Tensor, used: float) -> float:
    M64 = M.double()
    damped = M64 + used * torch.diagonal(M64).mean().clamp_min(1e-30) * torch.eye(M.shape[0], dtype=torch.float64)
    return float((damped @ inv.double() - torch.eye(M.shape[0], dtype=torch.float64)).abs().max())


def test_indefinite_factor_escalates_damping_and_stays_finite():
    M = torch.diag(torch.tensor([1.0, 1.0, -0.5, 2.0]))  # a negative eigenvalue: Cholesky fails at frac 0.01
    inv, used = damped_inverse(M, 0.01)
    assert used > 0.01 and torch.isfinite(inv).all()
    assert _residual(M, inv, used) < 1e-5


def test_zero_rows_and_singular_factor_escalate_from_zero_damping():
    M = torch.zeros(6, 6)
    M[:3, :3] = torch.eye(3) * 2.0  # rows 3..5 are zero: singular, Cholesky fails without damping
    inv, used = damped_inverse(M, 0.0)
    assert used >= 1e-8 and torch.isfinite(inv).all()
    inv_ok, used_ok = damped_inverse(M[:3, :3], 0.0)  # positive definite: no escalation
    assert used_ok == 0.0 and torch.allclose(inv_ok, torch.eye(3) / 2.0)


def test_nan_factor_is_refused():
    M = torch.eye(3)
    M[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        damped_inverse(M, 0.01)


def test_dead_inputs_escalate_in_a_real_shot_and_weights_stay_finite():
    model = tiny_model("llama")
    with torch.no_grad():  # 8 dead hidden dimensions into q/k/v: the input factor A has zero rows
        model.model.layers[0].input_layernorm.weight[:8] = 0.0
    opts = PruneOptions(method="llm-surgeon", structure="unstructured", damping_a=0.0, damping_g=0.0)
    report = prune_shot(model, tiny_windows(4, 16), options=opts, target_size=0.8)
    assert report.damping_escalations >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(report.achieved_size - 0.8) < 0.01


def test_fp16_calibration_overflow_is_detected_before_any_weight_changes():
    model = overflowing_model(1e4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = PruneOptions(method="llm-surgeon", structure="unstructured", autocast_dtype=torch.float16)
    with pytest.raises(NonFiniteCurvatureError, match="calibration overflow.*float16"):
        prune_shot(model, tiny_windows(4, 32), options=opts, target_size=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rounded_bf16_factors_are_caught_before_any_weight_changes():
    from surgeon_core.shot import RoundedCurvatureError

    windows, opts = rank_deficient_setup()
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RoundedCurvatureError, match="not positive definite"):
        prune_shot(model, windows, options=PruneOptions(**opts, gram_dtype=torch.bfloat16), target_size=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prune_shot(model, windows, options=PruneOptions(**opts), target_size=0.8)  # exact Gram matrices: no error
