"""Zero-shot evaluation through the command: `surgeon make-task` (output and one-line errors) and `surgeon eval
--tasks` on a tiny model (per-task metrics in the JSON, one-line errors). The library:
tests/surgeon/test_zeroshot.py."""

from __future__ import annotations

import json

import pytest

from surgeon import zeroshot as Z
from surgeon_cli.main import main
from zeroshot_fixtures import model_dir, task_dir, text_file, zs_inputs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_make_task_cli_and_errors(capsys, tmp_path, text_file):
    rc, out, err = run(capsys, "make-task", "choice", "--text", text_file, "--output", tmp_path / "t", "--n", 5,
                       "--seed", 1, "--holdout", 0.3)
    assert rc == 0, err
    assert "task choice_story: 5 documents" in out and (tmp_path / "t" / "choice_story.yaml").is_file()
    rc, out, err = run(capsys, "make-task", "lastword", "--text", text_file, "--output", tmp_path / "t", "--n", 10000,
                       "--name", "many")
    assert rc == 0 and "note: only" in err
    for args, message in [(["cloze"], "unknown task kind 'cloze'"),
                          (["choice", "--holdout", 0], "holdout must be in (0, 1]"),
                          (["choice", "--name", "a b"], "task name 'a b'")]:
        rc, out, err = run(capsys, "make-task", args[0], "--text", text_file, "--output", tmp_path / "bad", *args[1:])
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, err)
    rc, out, err = run(capsys, "make-task", "choice", "--text", tmp_path / "nope.txt", "--output", tmp_path / "bad")
    assert rc == 2 and "text file not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("a heading\n\nno prose here\n")
    rc, out, err = run(capsys, "make-task", "lastword", "--text", empty, "--output", tmp_path / "bad")
    assert rc == 2 and "no lastword documents" in err
    assert not (tmp_path / "bad").exists()


def test_eval_tasks_json_has_per_task_metrics(capsys, tmp_path, model_dir, task_dir, text_file):
    js = tmp_path / "zs.json"
    rc, out, err = run(capsys, "eval", "--model", model_dir, "--tasks", "lw,mc", "--task-dir", task_dir,
                       "--limit", 8, "--data", text_file, "--seqlen", 32, "--max-windows", 2, "--threads", 1,
                       "--json", js)
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert res["ppl"] > 1 and res["windows"] == 2  # perplexity and zero-shot in one call
    assert set(res["tasks"]) == {"lw", "mc"}
    for name, m in res["tasks"].items():
        assert m["n"] == 8 and 0 <= m["acc"] <= 1 and m["seconds"] > 0, name
        assert abs(m["acc"] * 8 - round(m["acc"] * 8)) < 1e-9 and m["acc_stderr"] >= 0
    assert 0 <= res["tasks"]["mc"]["acc_norm"] <= 1 and res["tasks"]["lw"]["perplexity"] > 1
    assert res["zeroshot_average"] == pytest.approx((res["tasks"]["lw"]["acc"] + res["tasks"]["mc"]["acc"]) / 2)
    assert set(res["lm_eval"]["results"]) == {"lw", "mc"} and "samples" not in res["lm_eval"]
    assert "| lw |" in out and "zero-shot average acc" in out and "bootstrapping" not in out


def test_eval_tasks_errors_are_one_line(capsys, tmp_path, model_dir, task_dir):
    cases = [
        (["--tasks", "nope", "--task-dir", task_dir], "unknown lm-eval task(s) nope"),
        (["--tasks", "lw", "--task-dir", tmp_path / "none"], "task folder not found"),
        ([], "nothing to evaluate"),
        (["--data", "x.txt"], "--data and --seqlen go together"),
        (["--task-dir", task_dir, "--data", "builtin:stdlib-docs", "--seqlen", 8], "give --tasks"),
    ]
    for args, message in cases:
        js = tmp_path / "never.json"
        rc, out, err = run(capsys, "eval", "--model", model_dir, *args, "--json", js)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0], (args, err)
        assert not js.exists()
