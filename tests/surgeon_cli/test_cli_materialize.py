"""`surgeon materialize` and the `surgeon prune --materialize` step: the smaller model on disk, its logit check
printed, one-line refusals, and `surgeon eval` on the result."""

import pytest
import torch

from tiny_models import coupled_pruned, tiny_windows

pytestmark = pytest.mark.unit


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_cli_materialize_opt(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    import surgeon.materialized_export  # noqa: F401 - registers the per-layer-size classes
    from surgeon_cli.main import main

    model = coupled_pruned("opt")
    x = tiny_windows(2, 16, seed=1)
    ref = _logits(model, x)
    model.save_pretrained(tmp_path / "src")
    rc = main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr()
    assert "materialized" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["num_heads"] < 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits(loaded, x) - ref).abs().max() <= 1e-4
    rc = main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "out")])  # not empty: error
    assert rc == 2


def test_prune_materialize_step_and_eval(tmp_path, capsys):
    """The `prune --materialize` step on an exported folder; `surgeon eval` loads the result (same ppl)."""
    import json

    from surgeon.models import save_model
    from surgeon_cli.main import main
    from surgeon_cli.outputs import materialize_output as _materialize_output
    from tiny_io import TEXT, tiny_tokenizer

    save_model(coupled_pruned("llama"), tiny_tokenizer(), tmp_path / "pruned")
    (tmp_path / "corpus.txt").write_text(TEXT)
    for _ in range(2):  # a re-run replaces the earlier materialized folder
        report = _materialize_output(str(tmp_path / "pruned"))
    assert report["output"] == str(tmp_path / "pruned-materialized")
    ppl = []
    for d in ("pruned", "pruned-materialized"):
        rc = main(["eval", "-m", str(tmp_path / d), "-d", str(tmp_path / "corpus.txt"), "-L", "32",
                   "--json", str(tmp_path / f"{d}.json")])
        assert rc == 0, capsys.readouterr().err
        ppl.append(json.loads((tmp_path / f"{d}.json").read_text())["ppl"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5)


def test_cli_materialize_prints_the_check(tmp_path, capsys):
    from surgeon_cli.main import main

    coupled_pruned("opt").save_pretrained(tmp_path / "src")
    assert main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "a")]) == 0
    assert "the zeroed model's function (max |Δlogit| float64" in capsys.readouterr().out
    assert main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "b"), "--no-verify"]) == 0
    assert "logit check skipped" in capsys.readouterr().out


def test_materialize_refuses_a_model_with_nothing_to_drop(tmp_path, capsys):
    """A model without an all-zero unit (dense, or unstructured zeros) is refused in one line, nothing written."""
    from surgeon_cli.main import main
    from tiny_models import tiny_model as _tiny

    _tiny("llama").save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["materialize", str(tmp_path / "src"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nothing to drop" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prune_materialize_step_warns_when_nothing_can_be_dropped(tmp_path, capsys):
    """After a pruning whose output has no all-zero unit, `prune --materialize` warns instead of failing the run."""
    from surgeon_cli.outputs import materialize_output as _materialize_output
    from tiny_models import tiny_model as _tiny

    _tiny("opt").save_pretrained(tmp_path / "pruned")
    report = _materialize_output(str(tmp_path / "pruned"))
    assert "nothing to drop" in report["skipped"]
    assert "warning: not materialized" in capsys.readouterr().err
    assert not (tmp_path / "pruned-materialized").exists()
