"""surgeon.runner.shot_with_fallback: a shot whose calibration overflows fp16/bf16, or whose bf16-rounded factors are
not positive definite, is rerun in fp32 (logged) and equals an fp32 shot; an overflow in fp32 too is a clear error
and leaves no NaN weights."""

from __future__ import annotations

import logging

import pytest
import torch

from surgeon_core.shot import PruneOptions, prune_shot
from tiny_models import overflowing_model, rank_deficient_setup, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


@pytest.mark.heavy
def test_overflow_falls_back_to_fp32_logged_and_equals_an_fp32_shot(caplog):
    from surgeon.runner import shot_with_fallback
    from surgeon_core.schedule import Step

    windows = tiny_windows(4, 32)
    fp16 = PruneOptions(method="llm-surgeon", structure="unstructured", autocast_dtype=torch.float16)
    model = overflowing_model(1e4)
    with caplog.at_level(logging.WARNING, logger="surgeon.runner"):
        report = shot_with_fallback(model, windows, fp16, Step(1, 1, 0.8))
    assert "rerunning the shot in fp32" in caplog.text and "float16" in report.extra["fp32_retry"]
    reference = overflowing_model(1e4)
    prune_shot(reference, windows, options=PruneOptions(method="llm-surgeon", structure="unstructured"),
               target_size=0.8)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_overflow_in_fp32_too_is_a_clear_error_and_no_nan_weights():
    from surgeon.runner import shot_with_fallback
    from surgeon_core.schedule import Step

    model = overflowing_model(1e20)  # overflows in bf16 and in fp32 alike
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = PruneOptions(method="llm-surgeon", structure="unstructured", autocast_dtype=torch.bfloat16)
    with pytest.raises(FloatingPointError, match="calibration overflow.*float32"):
        shot_with_fallback(model, tiny_windows(4, 32), bf16, Step(1, 1, 0.8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rounded_bf16_factors_rerun_with_fp32_factor_matmuls(caplog):
    from surgeon.runner import shot_with_fallback
    from surgeon_core.schedule import Step

    windows, opts = rank_deficient_setup()
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="surgeon.runner"):
        report = shot_with_fallback(model, windows, PruneOptions(**opts, gram_dtype=torch.bfloat16), Step(1, 1, 0.8))
    assert "rerunning the shot in fp32 factor matmuls" in caplog.text
    assert "bf16 factor matmuls" in report.extra["fp32_retry"]
    reference = tiny_model("llama")
    prune_shot(reference, windows, options=PruneOptions(**opts), target_size=0.8)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
