"""Numerics under stress: damping escalation for factors that are not positive definite (logged, never NaN/Inf
weights), and calibration overflow under fp16/bf16 (detected before any weight changes; the shot reruns in fp32)."""

from __future__ import annotations

import logging

import pytest
import torch

from surgeon_core.linalg import damped_inverse
from surgeon_core.shot import NonFiniteCurvatureError, PruneOptions, prune_shot
from tiny_models import tiny_model, tiny_windows

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


def _overflowing_model(scale: float):
    """A tiny Llama whose first MLP is scaled so that its output overflows fp16 (max 65504), not fp32."""
    model = tiny_model("llama")
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight.mul_(scale)
        mlp.down_proj.weight.mul_(scale)
    return model


def test_fp16_calibration_overflow_is_detected_before_any_weight_changes():
    model = _overflowing_model(1e4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = PruneOptions(method="llm-surgeon", structure="unstructured", autocast_dtype=torch.float16)
    with pytest.raises(NonFiniteCurvatureError, match="calibration overflow.*float16"):
        prune_shot(model, tiny_windows(4, 32), options=opts, target_size=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overflow_falls_back_to_fp32_logged_and_equals_an_fp32_shot(caplog):
    from surgeon.runner import shot_with_fallback
    from surgeon_core.schedule import Step

    windows = tiny_windows(4, 32)
    fp16 = PruneOptions(method="llm-surgeon", structure="unstructured", autocast_dtype=torch.float16)
    model = _overflowing_model(1e4)
    with caplog.at_level(logging.WARNING, logger="surgeon.runner"):
        report = shot_with_fallback(model, windows, fp16, Step(1, 1, 0.8))
    assert "rerunning the shot in fp32" in caplog.text and "float16" in report.extra["fp32_retry"]
    reference = _overflowing_model(1e4)
    prune_shot(reference, windows, options=PruneOptions(method="llm-surgeon", structure="unstructured"),
               target_size=0.8)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_overflow_in_fp32_too_is_a_clear_error_and_no_nan_weights():
    from surgeon.runner import shot_with_fallback
    from surgeon_core.schedule import Step

    model = _overflowing_model(1e20)  # overflows in bf16 and in fp32 alike
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = PruneOptions(method="llm-surgeon", structure="unstructured", autocast_dtype=torch.bfloat16)
    with pytest.raises(FloatingPointError, match="calibration overflow.*float32"):
        shot_with_fallback(model, tiny_windows(4, 32), bf16, Step(1, 1, 0.8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _rank_deficient_setup():
    """16 calibration tokens for 64-wide inputs: the input factors have rank <= 16, so with a tiny damping only exact
    (fp32) Gram matrices stay positive definite, not ones whose entries were rounded to bf16."""
    opts = dict(method="llm-surgeon", structure="unstructured", damping_a=1e-5, damping_g=1e-5)
    return tiny_windows(2, 8), opts


def test_rounded_bf16_factors_are_caught_before_any_weight_changes():
    from surgeon_core.shot import RoundedCurvatureError

    windows, opts = _rank_deficient_setup()
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RoundedCurvatureError, match="not positive definite"):
        prune_shot(model, windows, options=PruneOptions(**opts, gram_dtype=torch.bfloat16), target_size=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prune_shot(model, windows, options=PruneOptions(**opts), target_size=0.8)  # exact Gram matrices: no error


def test_rounded_bf16_factors_rerun_with_fp32_factor_matmuls(caplog):
    from surgeon.runner import shot_with_fallback
    from surgeon_core.schedule import Step

    windows, opts = _rank_deficient_setup()
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="surgeon.runner"):
        report = shot_with_fallback(model, windows, PruneOptions(**opts, gram_dtype=torch.bfloat16), Step(1, 1, 0.8))
    assert "rerunning the shot in fp32 factor matmuls" in caplog.text
    assert "bf16 factor matmuls" in report.extra["fp32_retry"]
    reference = tiny_model("llama")
    prune_shot(reference, windows, options=PruneOptions(**opts), target_size=0.8)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
