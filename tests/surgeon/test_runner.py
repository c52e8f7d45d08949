"""`surgeon.runner.run`: the whole run in one process. A run stopped after some steps (``stop_after``) and called
again with the same config and checkpoint folder resumes after the last finished step and ends with the same
weights and perplexities as an uninterrupted run; a checkpoint of another config is refused; a layer-wise method
takes one step; the exported output verifies. Benchmark configs through the runner: tests/surgeon/test_bench.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from surgeon.config import load_recipe
from surgeon.errors import SurgeonError
from surgeon.runner import run
from tiny_io import run_inputs, tiny_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return run_inputs(tmp_path_factory.mktemp("runner"))


recipe = tiny_recipe


def config(inputs, *overrides: str, **kw):
    return load_recipe(None, list(overrides), extra=recipe(inputs, **kw))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.heavy
def test_resumed_run_equals_an_uninterrupted_one(inputs, tmp_path, caplog):
    cfg = config(inputs)
    full = run(cfg, checkpoint=tmp_path / "full")
    assert [r["shot"] for r in full["steps"]] == [1, 2, 3] and "stopped_after" not in full
    assert [("eval" in r) for r in full["steps"]] == [False, True, True]  # nearest to 0.8, and the last

    part = run(cfg, checkpoint=tmp_path / "part", stop_after=1)
    assert part["stopped_after"] == 1 and [r["shot"] for r in part["steps"]] == [1] and "ppl" not in part
    state = json.loads((tmp_path / "part" / "state.json").read_text())
    assert [r["shot"] for r in state["result"]["steps"]] == [1]
    with caplog.at_level(logging.INFO, logger="surgeon.runner"):
        resumed = run(cfg, checkpoint=tmp_path / "part")
    assert any("resumed from" in m and "after step 1 of 3" in m for m in caplog.messages), caplog.messages

    assert same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))
    assert [r["shot"] for r in resumed["steps"]] == [1, 2, 3]
    assert [r.get("eval", {}).get("ppl") for r in resumed["steps"]] == \
        [r.get("eval", {}).get("ppl") for r in full["steps"]]
    assert resumed["dense"]["ppl"] == full["dense"]["ppl"] and resumed["ppl"] == full["ppl"]
    assert resumed["achieved_size"] == full["achieved_size"] and abs(full["achieved_size"] - 0.7) < 0.01


@pytest.mark.heavy
def test_checkpoint_of_another_config_is_refused(inputs, tmp_path):
    first = run(config(inputs), checkpoint=tmp_path / "other", stop_after=1)
    assert first["stopped_after"] == 1
    before = weights(tmp_path / "other")
    with pytest.raises(SurgeonError, match="checkpoint .*other holds another run"):
        run(config(inputs, "method.target_size=0.5"), checkpoint=tmp_path / "other")
    assert same_weights(weights(tmp_path / "other"), before)  # the refused run wrote nothing
    # fields that do not change the weights keep the checkpoint: the run resumes
    again = run(config(inputs, "compute.checkpoint_layers=true", "output.experiment=elsewhere"),
                checkpoint=tmp_path / "other")
    assert [r["shot"] for r in again["steps"]] == [1, 2, 3]


def test_finished_run_with_another_evaluation_is_reevaluated_not_pruned_again(inputs, tmp_path, caplog):
    """A finished run that evaluates only its final weights, called again with only its evaluation changed (here a
    second text), evaluates the dense and the final weights from the checkpoint: the same perplexities as a fresh run
    of the new config, the weights untouched. A run evaluated in between, or not finished, is refused."""
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(inputs["text"].read_text().split())))
    also = ("eval.at=[]", "method.shots=2", f"eval.also={{other: {other}}}")
    first = run(config(inputs, "eval.at=[]", "method.shots=2"), checkpoint=tmp_path / "ck")
    before = weights(tmp_path / "ck")
    with caplog.at_level(logging.INFO, logger="surgeon.runner"):
        again = run(config(inputs, *also), checkpoint=tmp_path / "ck")
    assert any("another evaluation" in m for m in caplog.messages), caplog.messages
    fresh = run(config(inputs, *also), checkpoint=tmp_path / "fresh")
    assert same_weights(weights(tmp_path / "ck"), before)
    assert again["steps"][-1]["seconds"] == first["steps"][-1]["seconds"]  # not pruned again
    assert again["ppl"] == fresh["ppl"] == first["ppl"] and again["dense"]["ppl"] == fresh["dense"]["ppl"]
    assert again["ppl_also"] == fresh["ppl_also"]
    assert again["dense_also"]["other"]["ppl"] == fresh["dense_also"]["other"]["ppl"]
    assert "ppl_also" not in first
    assert run(config(inputs, *also), checkpoint=tmp_path / "ck")["ppl_also"] == fresh["ppl_also"]  # plain resume

    run(config(inputs), checkpoint=tmp_path / "between")  # evaluated at 80% too
    with pytest.raises(SurgeonError, match="holds another run"):
        run(config(inputs, f"eval.also={{other: {other}}}"), checkpoint=tmp_path / "between")
    run(config(inputs, "eval.at=[]", "method.shots=2"), checkpoint=tmp_path / "part", stop_after=1)
    with pytest.raises(SurgeonError, match="holds another run"):
        run(config(inputs, *also), checkpoint=tmp_path / "part")


@pytest.mark.heavy
def test_interleaved_finetuning_keeps_masks_and_resumes_exactly(inputs, tmp_path):
    """finetune.steps: the weights move between shots (so the run differs from one without it), every pruned
    weight stays exactly 0, and a resumed run ends with the same weights as an uninterrupted one."""
    ft = ("finetune.steps=2", "finetune.lr=1e-3")
    full = run(config(inputs, *ft), checkpoint=tmp_path / "ft_full")
    run(config(inputs, *ft), checkpoint=tmp_path / "ft_part", stop_after=1)
    resumed = run(config(inputs, *ft), checkpoint=tmp_path / "ft_part")
    a, b = weights(tmp_path / "ft_full"), weights(tmp_path / "ft_part")
    assert same_weights(a, b) and resumed["ppl"] == full["ppl"]
    run(config(inputs), checkpoint=tmp_path / "ft_plain")
    c = weights(tmp_path / "ft_plain")
    lin = [k for k in a if k.endswith("proj.weight") and ".layers." in k]
    assert lin and any(not torch.equal(a[k], c[k]) for k in lin)  # the fine-tuning changed the kept weights
    for k in lin:  # about the same sparsity per linear (the runner raises if a pruned weight moved)
        assert abs(float((a[k] == 0).float().mean()) - float((c[k] == 0).float().mean())) < 0.05
    assert [len(r["finetune"]["losses"]) for r in full["steps"]] == [2, 2, 2]


def test_layerwise_method_takes_one_step(inputs, tmp_path):
    cfg = config(inputs, "method.name=wanda", "method.target_size=0.5", "method.shots=4")
    assert len(cfg.plan()) == 1
    result = run(cfg)
    (step,) = result["steps"]
    assert step["shot"] == 1 and step["num_shots"] == 1 and "eval" in step
    assert abs(result["achieved_size"] - 0.5) < 0.01 and result["ppl"] == step["eval"]["ppl"]


@pytest.mark.heavy
def test_run_exports_a_verified_output(inputs, tmp_path):
    """``output.path``: the final weights go to a complete folder whose manifest carries the recipe."""
    from surgeon.outputs import verify_dir

    out = tmp_path / "pruned"
    result = run(config(inputs, f"output.path={out}"), checkpoint=tmp_path / "ck")
    assert result["output"] == str(out) and same_weights(weights(out), weights(tmp_path / "ck"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == yaml.safe_load((out / "recipe.yaml").read_text())
    assert manifest["metrics"]["ppl"] == result["ppl"] and manifest["config_hash"] == result["config_hash"]
    assert verify_dir(out)["ok"], verify_dir(out)["problems"]


def test_factor_memory_is_checked_before_any_work_and_the_error_names_what_fits(caplog, monkeypatch):
    import surgeon_core.curvature as curvature
    from surgeon.runner import check_factor_memory
    from surgeon_core.adapters import adapter_for
    from surgeon_core.curvature import factor_memory
    from tiny_models import tiny_model

    monkeypatch.setattr(curvature, "PACK_BLOCK", 4)  # packing saves memory on the tiny factors too
    model = tiny_model("llama")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    full = factor_memory(model, adapter_for(model))["peak"]
    cfg = load_recipe(None, model="some/model")
    with caplog.at_level(logging.INFO, logger="surgeon.runner"):
        assert check_factor_memory(cfg, model, weights + full)["peak"] == full
    assert "K-FAC factors per GPU: at most" in caplog.text
    with pytest.raises(SurgeonError, match=r"compute.factor_passes=\d+ compute.factor_storage=packed would need") as e:
        check_factor_memory(cfg, model, weights + int(0.8 * full))
    assert "\n" not in str(e.value)
    with pytest.raises(SurgeonError, match="no number of layer-block passes fits"):
        check_factor_memory(cfg, model, weights + 1000)
    assert check_factor_memory(load_recipe(None, ["method=magnitude"], model="m"), model, 0) is None
    assert check_factor_memory(load_recipe(None, ["method=wanda", "structure=2:4"], model="m"), model, 0) is None
