"""Zero-shot evaluation (surgeon.zeroshot): tasks made from a text (valid, deterministic, held-out part only), lm-eval
on a tiny model (the same numbers as plain lm-eval, also from a moved task folder), task names and averages, and the
runner measuring zero-shot accuracy in process. The commands: tests/surgeon_cli/test_cli_zeroshot.py."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from surgeon import zeroshot as Z
from zeroshot_fixtures import model_dir, task_dir, text_file, zs_inputs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_are_valid_and_come_from_the_held_out_part(task_dir, text_file):
    source = " ".join(text_file.read_text().split())
    heldout = " ".join(Z.read_heldout(text_file, 0.3).split())
    assert "Zanzibar" in source and "Zanzibar" not in heldout  # the first half is never used

    cfg = yaml.safe_load((task_dir / "lw.yaml").read_text())
    assert cfg["task"] == "lw" and cfg["output_type"] == "loglikelihood" and cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((task_dir / "lw.jsonl").resolve())
    docs = rows(task_dir / "lw.jsonl")
    assert len(docs) == 12 and cfg["metadata"]["documents"] == 12
    for d in docs:
        assert d["target"].startswith(" ") and d["target"][1:].isalpha() and len(d["target"]) >= 4
        assert f"{d['context']}{d['target']} ." in heldout  # a passage of the text up to its last word
        assert len(d["context"].split()) >= 39

    cfg = yaml.safe_load((task_dir / "mc.yaml").read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["doc_to_choice"] == "choices"
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    docs = rows(task_dir / "mc.jsonl")
    assert len(docs) == 12
    for d in docs:
        assert len(d["choices"]) == 4 == len(set(d["choices"])) and 0 <= d["label"] < 4
        assert f"{d['context']} {d['choices'][d['label']]}" in heldout  # the true next sentence
        assert all(c in heldout and f"{d['context']} {c}" not in heldout
                   for i, c in enumerate(d["choices"]) if i != d["label"])
    assert len({d["label"] for d in docs}) > 1


def test_make_task_is_deterministic_for_a_seed(tmp_path, text_file):
    for kind in Z.KINDS:
        a = Z.make_task(kind, text_file, tmp_path / "a", name="t", n=10, seed=3, holdout=0.3)
        b = Z.make_task(kind, text_file, tmp_path / "b", name="t", n=10, seed=3, holdout=0.3)
        c = Z.make_task(kind, text_file, tmp_path / "c", name="t", n=10, seed=4, holdout=0.3)
        data = [open(x["data"], "rb").read() for x in (a, b, c)]
        assert data[0] == data[1] and data[0] != data[2], kind
        assert open(a["yaml"]).read() == open(b["yaml"]).read().replace(str(tmp_path / "b"), str(tmp_path / "a"))


@pytest.mark.heavy
def test_same_numbers_as_plain_lm_eval_and_a_moved_task_folder(tmp_path, model_dir, task_dir):
    """The task YAML works as is with lm-eval's own TaskManager(include_path=DIR); a moved folder still works."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from surgeon.models import load_model

    model, tok, _ = load_model(model_dir)
    plain = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=["mc", "lw"],
                                    task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                    limit=6, log_samples=False, bootstrap_iters=0)
    shutil.copytree(task_dir, tmp_path / "copy")
    moved = tmp_path / "moved"
    (tmp_path / "copy").rename(moved)  # a moved folder: its YAMLs name data files that are gone
    for yml in moved.glob("*.yaml"):
        yml.write_text(yml.read_text().replace(str(task_dir), str(tmp_path / "copy")))
    ours = Z.evaluate_model(model, tok, ["mc", "lw"], task_dir=moved, limit=6)
    for name in ("mc", "lw"):
        assert ours["tasks"][name]["acc"] == pytest.approx(plain["results"][name]["acc,none"])
    assert ours["tasks"]["mc"]["acc_norm"] == pytest.approx(plain["results"]["mc"]["acc_norm,none"])
    assert math.isfinite(ours["average"])
    (moved / "mc.jsonl").unlink()
    with pytest.raises(Z.SurgeonError, match="task mc: data file .* not found"):
        Z.evaluate_model(model, tok, ["mc"], task_dir=moved, limit=2)


def test_parse_tasks_and_average():
    assert Z.parse_tasks("lw, mc,lw") == ["lw", "mc"]
    assert Z.parse_tasks(["standard"]) == list(Z.STANDARD_SUITE)
    with pytest.raises(Z.SurgeonError, match="no zero-shot tasks"):
        Z.parse_tasks(" , ")
    assert Z.average_accuracy({"a": {"acc": 0.5}, "b": {"acc": 0.25, "acc_norm": 1.0}, "c": {"perplexity": 3}}) \
        == pytest.approx(0.375)


@pytest.mark.heavy
def test_in_process_run_measures_zero_shot_accuracy_dense_and_at_evaluated_steps(model_dir, task_dir, text_file):
    from surgeon.config import load_recipe
    from surgeon.runner import run as run_recipe

    cfg = load_recipe(None, [f"calibration.data={text_file}", "nsamples=2", "seqlen=16", "shots=2",
                             "eval.zeroshot_tasks=lw,mc", f"eval.task_dir={task_dir}", "threads=1"],
                      model=str(model_dir), target_size=0.8)
    result = run_recipe(cfg)
    assert set(result["dense_zeroshot"]["tasks"]) == {"lw", "mc"}
    assert [bool(row.get("zeroshot")) for row in result["steps"]] == [False, True]  # the last step is evaluated
    assert result["zeroshot"] == result["steps"][-1]["zeroshot"]
    assert 0.0 <= result["zeroshot"]["average"] <= 1.0
