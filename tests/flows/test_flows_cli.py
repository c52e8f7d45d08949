"""`surgeon prune`, `surgeon promote` and `surgeon sweep` under the flows' Prefect test harness
(tests/flows/conftest.py): recipe overrides, fine-tuning flags, the promotion gate's exit codes, one-line errors
before any flow run."""

from __future__ import annotations

import pytest
import yaml

from tiny_io import surgeon

pytestmark = pytest.mark.flows


def _cli(capsys, *args):
    rc = surgeon(*args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prune_recipe_overrides_no_register(tiny_recipe, tmp_path, capsys):
    import json

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "shots": 1}))
    js = tmp_path / "r.json"
    rc, out, err = _cli(capsys, "prune", "--config", recipe, "target_size=0.8", "--output", tmp_path / "o",
                        "--no-register", "--json", js)
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert res["registered_version"] is None and res["config"]["method"]["target_size"] == 0.8
    assert abs(res["achieved_size"] - 0.8) < 0.01 and f"ppl {res['ppl']:.3f}" in out
    saved = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())
    assert saved["method"]["target_size"] == 0.8 and saved["output"]["register_model"] is False
    # a bad key is one line naming it, before any flow run
    rc, out, err = _cli(capsys, "prune", "--config", recipe, "shotz=2")
    assert rc == 2 and err.strip() == "error: unknown recipe key 'shotz'"


def test_cli_promote_gate_exit_codes(first_run, capsys):
    v = first_run["registered_version"]
    rc, out, err = _cli(capsys, "promote", "--model-name", "tiny-llama", "--version", v, "--max-ppl-ratio", "0.5")
    assert rc == 1 and "not promoted" in err
    rc, out, err = _cli(capsys, "promote", "--model-name", "tiny-llama", "--version", v, "--max-ppl-ratio", "50")
    assert rc == 0 and f"promoted tiny-llama version {v} to 'champion'" in out
    rc, out, err = _cli(capsys, "promote", "--model-name", "tiny-llama", "--version", "999")
    assert rc == 2 and "version 999 not found" in err.strip().splitlines()[-1]


def test_cli_sweep_bad_variant_is_one_line(tiny_recipe, tmp_path, capsys):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "sweep": [{"method": "magnitude"}, {"methd": "kobd"}]}))
    rc, out, err = _cli(capsys, "sweep", "--config", recipe)
    assert rc == 2 and err.strip() == "error: sweep[1]: unknown recipe key 'methd'"


def test_cli_prune_finetune_flags(tiny_recipe, tmp_path, capsys):
    import json

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "shots": 1}))
    js = tmp_path / "r.json"
    rc, out, err = _cli(capsys, "prune", "--config", recipe, "--finetune-steps", 1, "--output", tmp_path / "o",
                        "--no-register", "--json", js, "final_finetune_steps=2", "finetune.lr=1e-3",
                        "finetune_train=both")
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert {k: res["config"]["finetune"][k] for k in ("steps", "final_steps", "lr", "train")} \
        == {"steps": 1, "final_steps": 2, "lr": 1e-3, "train": "both"}
    assert res["shots"][0]["finetune_loss"] > 0
    rc, out, err = _cli(capsys, "prune", "--config", recipe, "finetune.train=embeddings")
    assert rc == 2 and "finetune.train" in err.strip().splitlines()[-1]
    rc, out, err = _cli(capsys, "prune", "--config", recipe, "--method", "magnitude", "first_order=true")
    assert rc == 2 and "method magnitude has no option 'first_order'" in err
    rc, out, err = _cli(capsys, "prune", "--config", recipe, "fisher=sampled", "first_order=true")
    assert rc == 2 and "first_order needs method llm-surgeon or kobd" in err
