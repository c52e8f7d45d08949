"""surgeon.runner.Runner.finetune with the recipe's fine-tuning section: validation windows carved from the
calibration data, the guard, distillation from the dense model through the whole run (the fine-tuning itself:
tests/surgeon_core/test_finetune.py)."""

import logging

import pytest
import torch

from surgeon_core.finetune import mask_violations, pruning_masks
from tiny_io import run_inputs, tiny_recipe
from tiny_models import shot_pruned as pruned
from tiny_models import tiny_windows

pytestmark = pytest.mark.unit


def _runner(windows, **finetune):
    from surgeon.config import PruneConfig
    from surgeon.runner import Runner

    cfg = PruneConfig(model="tiny", finetune={"batch_size": 2, "loss": "ce", **finetune}, compute={"device": "cpu"},
                      calibration={"nsamples": windows.shape[0], "seqlen": windows.shape[1]})
    return Runner(cfg, pruned(), windows)


def test_recipe_holdout_keeps_fine_tuning_from_hurting_the_held_out_windows():
    """finetune.holdout: held-out windows are not trained on and decide which weights are kept."""
    from surgeon.config import build_config
    from surgeon.errors import SurgeonError
    from surgeon_core.schedule import Step

    windows = tiny_windows(8, 16, seed=6)
    runner = _runner(windows, lr=0.3, schedule="constant", holdout=0.25, validate_every=3, patience=0)
    masks = pruning_masks(runner.model)
    train, held = runner.validation_split()
    assert held.shape == (2, 16) and train.shape == (6, 16)
    before = runner._loss(runner.model, held)
    report = runner.finetune(Step(shot=1, num_shots=1, target_size=0.6, finetune_steps=9))
    assert [s for s, _ in report["validation"]] == [0, 3, 6, 9]
    assert runner._loss(runner.model, held) <= before + 1e-6
    assert report["tokens"] == 9 * 2 * 16 and mask_violations(runner.model, masks) == 0
    assert (report["train_windows"], report["validation_windows"]) == (6, 2)
    with pytest.raises(SurgeonError, match="finetune.holdout"):
        build_config({"model": "tiny", "finetune_holdout": 1.0})
    with pytest.raises(SurgeonError, match="holdout_min"):
        build_config({"model": "tiny", "nsamples": 2, "finetune_steps": 4})
    assert build_config({"model": "tiny", "nsamples": 2, "finetune_steps": 4, "finetune_holdout": 0}).finetune.active


def test_validation_windows_share_no_tokens_with_the_training_windows():
    """Calibration windows drawn like surgeon.data.calibration_windows from one sequence of distinct ids: the
    runner's validation windows share no token (so no position) with its training windows; default holdout 10%
    with at least 2 windows."""
    from surgeon.data import calibration_windows

    ids = torch.randperm(2000, generator=torch.Generator().manual_seed(3))
    windows = calibration_windows(ids, 40, 64, seed=1)
    train, held = _runner(windows).validation_split()
    assert held.shape[0] == 4 and train.shape[0] == 36
    assert not set(held.flatten().tolist()) & set(train.flatten().tolist())
    train, held = _runner(windows[:8]).validation_split()
    assert held.shape[0] == 2 and train.shape[0] == 6


def test_guard_keeps_the_weights_from_before_fine_tuning_and_says_so(caplog):
    """lr huge: no validation beats the value before fine-tuning, so the run keeps the pre-fine-tuning weights,
    reports kept_pre_finetune and logs a warning."""
    from surgeon_core.finetune import FinetuneOptions, finetune
    from surgeon_core.schedule import Step

    windows = tiny_windows(8, 16, seed=11)
    runner = _runner(windows, lr=50.0, schedule="constant", validate_every=2, holdout=0.25)
    _, held = runner.validation_split()
    finetune(runner.model, held, options=FinetuneOptions(steps=30, lr=1e-2, train="both", batch_size=2))
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="surgeon.runner"):
        report = runner.finetune(Step(shot=1, num_shots=1, target_size=0.6, finetune_steps=6))
    assert report["kept_pre_finetune"] and report["best_step"] == 0
    assert all(torch.equal(p, before[n]) for n, p in runner.model.named_parameters())
    assert any("did not lower the validation loss" in m and "from before fine-tuning are kept" in m
               for m in caplog.messages), caplog.messages


@pytest.mark.heavy
def test_run_distils_from_the_dense_model_once_and_reports_the_chosen_steps(tmp_path, monkeypatch):
    """A whole run with distillation (finetune.loss kd): the teacher is computed once, from the dense model, before
    the first shot; every fine-tuning keeps the masks, reports train and validation losses; the summary names the
    chosen step; eval.also texts are evaluated beside eval.data; the flow's finetune_step_dir gets the same
    teacher from the recipe's model."""
    import surgeon.runner as runner_mod
    from surgeon.bench import metrics_of
    from surgeon.config import load_recipe
    from surgeon_core.schedule import Step

    inputs = run_inputs(tmp_path)
    seen = []
    real = runner_mod.teacher_targets

    def spy(model, windows, **kw):
        seen.append((sum(int((p == 0).sum()) for p in model.parameters()), windows.shape))
        return real(model, windows, **kw)

    monkeypatch.setattr(runner_mod, "teacher_targets", spy)
    recipe = tiny_recipe(inputs, finetune={"steps": 2, "final_steps": 2, "lr": 1e-3, "loss": "kd"})
    recipe["calibration"]["nsamples"] = 8
    recipe["eval"]["also"] = {"again": str(inputs["text"])}
    cfg = load_recipe(None, [], extra=recipe)
    assert load_recipe(None, [], extra=tiny_recipe(inputs)).finetune.loss == "mix"  # the default
    result = runner_mod.run(cfg)
    assert len(seen) == 1 and seen[0][1] == (6, 16)  # training windows only: 8 minus 2 held out
    rows = [r["finetune"] for r in result["steps"]]
    assert [r["planned_steps"] for r in rows] == [2, 2, 4]
    for r in rows:
        assert r["loss"] == "kd" and len(r["losses"]) == r["steps"] and r["validation"][0][0] == 0
        assert r["best_step"] in [s for s, _ in r["validation"]] and r["extra"]["teacher_bytes"] > 0
    assert result["finetune_best_step"] == rows[-1]["best_step"]
    assert [f["best_step"] for f in result["finetune"]] == [r["best_step"] for r in rows]
    m = metrics_of(result)
    assert m["dense_ppl/again"] == pytest.approx(m["dense_ppl"]) and "ppl/again" in m

    dense_zeros = seen[0][0]
    from surgeon.inputs import build_calibration, load_windows

    calib = build_calibration(cfg, str(inputs["model"])).path
    model, tok = runner_mod.load_for_pruning(str(inputs["model"]), cfg)
    runner_mod.Runner(cfg, model, load_windows(calib)).prune(Step(shot=1, num_shots=1, target_size=0.7))
    runner_mod.save_model(model, tok, tmp_path / "pruned")
    rep = runner_mod.finetune_step_dir(cfg, str(tmp_path / "pruned"), calib,
                                       Step(shot=1, num_shots=1, target_size=0.7, finetune_steps=2),
                                       str(tmp_path / "ckpt"))
    assert len(seen) == 2 and seen[1][0] == dense_zeros and rep["loss"] == "kd"  # the teacher is the dense model


@pytest.mark.heavy
def test_finetune_data_gives_the_windows_fine_tuning_trains_and_validates_on(tmp_path, monkeypatch):
    """finetune.data: its text cut into non-overlapping windows of calibration.seqlen (the first finetune.windows),
    the held-out ones among them; pruning still sees the calibration windows; the data's id is in the result and in
    the checkpoint's signature (another text is another run)."""
    import surgeon.runner as runner_mod
    from surgeon.config import load_recipe
    from surgeon.errors import SurgeonError
    from surgeon.inputs import build_finetune, load_windows, preflight
    from tiny_io import tiny_tokenizer

    inputs = run_inputs(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("".join(f"Garden {i} lies {3 * i + 1} miles down river {i * i}.\n" for i in range(60)))
    taught, shot_windows = [], []
    real_teacher, real_shot = runner_mod.teacher_targets, runner_mod.shot_with_fallback
    monkeypatch.setattr(runner_mod, "teacher_targets", lambda m, w, **kw: taught.append(w) or real_teacher(m, w, **kw))
    monkeypatch.setattr(runner_mod, "shot_with_fallback",
                        lambda m, w, *a, **kw: shot_windows.append(w) or real_shot(m, w, *a, **kw))
    recipe = tiny_recipe(inputs, finetune={"final_steps": 2, "lr": 1e-3, "data": str(other), "windows": 10,
                                           "holdout": 0.2})
    cfg = load_recipe(None, [], extra=recipe)
    src, calib, _, ref = preflight(cfg)
    windows = load_windows(ref.path)
    ids = tiny_tokenizer()(other.read_text(), add_special_tokens=False)["input_ids"]
    assert torch.equal(windows, torch.tensor(ids[:160]).view(10, 16))  # consecutive, no overlap, the first ten
    ckpt = tmp_path / "ckpt"
    result = runner_mod.run(cfg, checkpoint=ckpt)
    assert result["finetune_data_id"] == ref.data_id
    assert len(taught) == 1 and taught[0].shape == (8, 16)  # ten windows, two held out
    assert all(torch.equal(t, windows[i]) for i, t in zip(range(8), taught[0]))  # the first eight train
    assert all(w.shape == (4, 16) for w in shot_windows)  # the shots' curvature: the calibration windows
    assert result["finetune"][-1]["validation_windows"] == 2
    with pytest.raises(SurgeonError, match="holds another run"):
        runner_mod.run(load_recipe(None, ["finetune.windows=9"], extra=recipe), checkpoint=ckpt)
    with pytest.raises(SurgeonError, match="holds \d+ windows of 16 tokens, fewer than finetune.windows = 10000"):
        build_finetune(load_recipe(None, ["finetune.windows=10000"], extra=recipe), src, calib)
    assert build_finetune(load_recipe(None, ["finetune.final_steps=0"], extra=recipe), src, calib) is None


def test_finetune_data_settings_are_checked_in_the_recipe():
    from surgeon.config import PruneConfig

    with pytest.raises(ValueError, match="finetune.windows limits the windows of finetune.data"):
        PruneConfig(model="tiny", finetune={"final_steps": 2, "windows": 4})
    with pytest.raises(ValueError, match="at least 1"):
        PruneConfig(model="tiny", finetune={"final_steps": 2, "data": "x.txt", "windows": 0})
    base = PruneConfig(model="tiny", finetune={"final_steps": 2})
    same = PruneConfig(model="tiny", finetune={"final_steps": 2, "data": None, "windows": None})
    assert same.config_hash() == base.config_hash()  # added later: earlier recipes keep their hashes
    assert PruneConfig(model="tiny", finetune={"final_steps": 2, "data": "x.txt"}).config_hash() != base.config_hash()


@pytest.mark.heavy
def test_generated_finetune_data_is_sampled_from_the_dense_model_once(tmp_path, monkeypatch):
    """finetune.data generated: calibration.nsamples windows sampled from the dense model, each starting with a
    calibration window's first token; cached (a damaged cache file is sampled again); a whole run distils on them."""
    import surgeon.inputs as inputs_mod
    import surgeon.runner as runner_mod
    from surgeon.config import load_recipe
    from surgeon.errors import SurgeonError

    inputs = run_inputs(tmp_path)
    calls = []
    real = inputs_mod.sample_windows
    monkeypatch.setattr(inputs_mod, "sample_windows", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    recipe = tiny_recipe(inputs, finetune={"final_steps": 2, "lr": 1e-3, "loss": "kd", "data": "generated"})
    cfg = load_recipe(None, [], extra=recipe)
    _, calib, _, ref = inputs_mod.preflight(cfg)
    windows, calib_windows = inputs_mod.load_windows(ref.path), inputs_mod.load_windows(calib.path)
    assert windows.shape == (4, 16) and torch.equal(windows[:, 0], calib_windows[:, 0]) and len(calls) == 1
    assert not torch.equal(windows, calib_windows)
    assert inputs_mod.preflight(cfg)[3] == ref and len(calls) == 1  # from the cache
    with open(ref.path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    assert inputs_mod.preflight(cfg)[3] == ref and len(calls) == 2  # damaged: sampled again, the same windows
    result = runner_mod.run(cfg)
    assert result["finetune_data_id"] == ref.data_id and len(calls) == 2
    assert result["finetune"][-1]["train_windows"] == 2 and result["finetune"][-1]["validation_windows"] == 2
    with pytest.raises(SurgeonError, match="more than finetune.holdout_min = 2 windows, it has 2"):
        load_recipe(None, ["finetune.windows=2"], extra=recipe)


def test_sampling_batch_fills_a_bounded_key_value_cache():
    from types import SimpleNamespace

    from surgeon.inputs import SAMPLING_CACHE_BYTES, sampling_batch

    config = SimpleNamespace(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=256)
    per_window = 2 * 4 * 2 * 32 * 1024 * 4  # keys and values, layers, kv heads, head dim, tokens, fp32
    assert sampling_batch(config, 1024, 10**6, 1) == SAMPLING_CACHE_BYTES // per_window
    assert sampling_batch(config, 1024, 50, 1) == 50  # never more than the windows
    assert sampling_batch(config, 2**20, 50, 3) == 3  # never fewer than compute.batch_size
    assert sampling_batch(SimpleNamespace(), 1024, 50, 3) == 3  # unknown shapes: compute.batch_size
