"""surgeon.runner.Runner.finetune with the recipe's fine-tuning section: finetune.holdout keeps the last windows out
of training and lets them decide which weights are kept (the fine-tuning itself:
tests/surgeon_core/test_finetune.py)."""

import pytest

from surgeon_core.finetune import mask_violations, pruning_masks
from tiny_models import shot_pruned as pruned
from tiny_models import tiny_windows

pytestmark = pytest.mark.unit




def test_recipe_holdout_keeps_fine_tuning_from_hurting_the_held_out_windows():
    """finetune.holdout: the last windows are not trained on and decide which weights are kept."""
    from surgeon.config import PruneConfig, build_config
    from surgeon.errors import SurgeonError
    from surgeon.runner import Runner
    from surgeon_core.schedule import Step

    model = pruned()
    masks = pruning_masks(model)
    windows = tiny_windows(8, 16, seed=6)
    cfg = PruneConfig(model="tiny", finetune={"lr": 0.3, "batch_size": 2, "schedule": "constant", "holdout": 0.25, "loss": "ce",
                                              "validate_every": 3}, compute={"device": "cpu"})
    runner = Runner(cfg, model, windows)
    before = runner._loss(model, windows[-2:])
    report = runner.finetune(Step(shot=1, num_shots=1, target_size=0.6, finetune_steps=9))
    assert [s for s, _ in report["validation"]] == [0, 3, 6, 9]
    assert runner._loss(model, windows[-2:]) <= before + 1e-6
    assert report["tokens"] == 9 * 2 * 16 and mask_violations(model, masks) == 0
    with pytest.raises(SurgeonError, match="finetune.holdout"):
        build_config({"model": "tiny", "finetune_holdout": 1.0})
