import pytest

from surgeon_core.schedule import Step, linear_schedule, plan


def test_linear_schedule_by_hand():
    assert linear_schedule(0.7, 3) == pytest.approx([0.9, 0.8, 0.7])
    assert linear_schedule(0.5, 1) == [0.5]


def test_plan_evaluates_the_nearest_shots_and_always_the_last():
    steps = plan(0.7, 12, eval_at=[0.9, 0.8])
    assert [s.shot for s in steps if s.evaluate] == [4, 8, 12]
    assert steps[-1].last and not steps[0].last
    assert steps[-1].target_size == pytest.approx(0.7)


def test_layerwise_methods_take_one_step_whatever_the_shot_count():
    assert plan(0.5, 40, layerwise=True) == [Step(1, 1, 0.5, evaluate=True)]


def test_finetuning_follows_every_shot_and_longer_after_the_last():
    steps = plan(0.8, 2, finetune_steps=3, final_finetune_steps=10)
    assert [s.finetune_steps for s in steps] == [3, 13]


@pytest.mark.parametrize("kwargs", [dict(target_size=0.0, shots=1), dict(target_size=0.5, shots=0),
                                    dict(target_size=0.5, shots=2, eval_at=[1.5]),
                                    dict(target_size=0.5, shots=2, finetune_steps=-1)])
def test_plan_refuses_bad_input(kwargs):
    with pytest.raises(ValueError):
        plan(**kwargs)
