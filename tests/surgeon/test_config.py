"""The recipe (surgeon.config): sections, flat names, validation at load against the method registry, the weight
hash, the round trip through YAML and the plan."""

from __future__ import annotations

import math

import pytest
import yaml

from surgeon.config import ALIASES, SECTIONS, PruneConfig, build_config, load_recipe, load_yaml
from surgeon.errors import SurgeonError
from surgeon_core.methods import METHODS
from surgeon_core.schedule import Step

pytestmark = pytest.mark.unit


def cfg_of(*overrides: str, **extra) -> PruneConfig:
    return load_recipe(None, list(overrides), extra={"model": "tiny", **extra})


def test_sections_and_defaults():
    cfg = PruneConfig(model="tiny")
    assert list(PruneConfig.model_fields) == ["model", *SECTIONS]
    assert (cfg.method.name, cfg.method.structure, cfg.method.shots, cfg.final_target) == \
        ("llm-surgeon", "structured", 1, 0.7)
    assert (cfg.calibration.nsamples, cfg.calibration.seqlen, cfg.eval.data, cfg.compute.device) == \
        (32, 512, None, "cpu")
    assert cfg.finetune.steps == 0 and not cfg.finetune.active and cfg.output.path is None
    assert cfg.method.options() == {}  # unset options take the registry's defaults
    flat = cfg.flat()
    assert flat["model"] == "tiny" and flat["method.name"] == "llm-surgeon" and flat["compute.threads"] is None
    assert set(flat) == {"model"} | {f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.model_fields}


def test_sectioned_recipe_and_shorthands():
    cfg = build_config({"model": "tiny", "method": "wanda", "calibration": "data/c.txt", "eval": "data/e.txt",
                        "output": "runs/o", "compute": {"device": "cuda:1", "batch_size": 4},
                        "structure": "unstructured"})
    assert (cfg.method.name, cfg.calibration.data, cfg.eval.data, cfg.output.path) == \
        ("wanda", "data/c.txt", "data/e.txt", "runs/o")
    assert cfg.compute.device == "cuda:1" and cfg.compute.batch_size == 4 and cfg.method.structure == "unstructured"


@pytest.mark.parametrize("key", ["shots", "method.shots", "method_shots"])
def test_flat_dotted_and_section_field_names(key):
    assert cfg_of(f"{key}=3").method.shots == 3
    assert load_recipe(None, model="tiny", **{key.replace(".", "_"): 3}).method.shots == 3


def test_flat_names_reach_their_sections():
    cfg = cfg_of("eval_data=e.txt", "eval.seqlen=64", "nsamples=8", "seqlen=32", "batch_size=2", "seed=5",
                 "finetune_steps=3", "final_finetune_steps=4", "compute_dtype=bf16", "register_model=false",
                 "threads=1", "damping_g=0.2", "eval_at=[0.9, 0.8]", "zeroshot_tasks=a,b")
    assert (cfg.eval.data, cfg.eval.seqlen, cfg.eval.at, cfg.eval.zeroshot_tasks) == ("e.txt", 64, [0.9, 0.8],
                                                                                         ["a", "b"])
    assert (cfg.calibration.nsamples, cfg.calibration.seqlen, cfg.calibration.seed) == (8, 32, 0)  # seed: method's
    assert (cfg.compute.batch_size, cfg.compute.dtype, cfg.compute.threads) == (2, "bf16", 1)
    assert (cfg.method.seed, cfg.method.damping_g) == (5, 0.2)
    assert (cfg.finetune.steps, cfg.finetune.final_steps, cfg.output.register_model) == (3, 4, False)
    for sec, cls in SECTIONS.items():  # every field has its dotted and its section_field name
        for f in cls.model_fields:
            assert ALIASES[f"{sec}.{f}"] == ALIASES[f"{sec}_{f}"] == (sec, f)


def test_later_layers_win_field_by_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny\nmethod: {name: kobd, shots: 4}\ncalibration: {nsamples: 8, seqlen: 32}\n")
    cfg = load_recipe(path, ["calibration.nsamples=16"], shots=2)
    assert (cfg.method.name, cfg.method.shots) == ("kobd", 2)
    assert (cfg.calibration.nsamples, cfg.calibration.seqlen) == (16, 32)


@pytest.mark.parametrize("name,choices", [("data", "calibration.data or eval.data"),
                                          ("split", "calibration.split or eval.split"),
                                          ("column", "calibration.column or eval.column")])
def test_an_ambiguous_bare_name_is_refused_naming_the_choices(name, choices):
    with pytest.raises(SurgeonError, match=f"recipe key '{name}' is ambiguous: say {choices}"):
        cfg_of(f"{name}=x")


def test_unknown_keys_are_refused():
    with pytest.raises(SurgeonError, match="unknown recipe key 'shotz'"):
        cfg_of("shotz=2")
    with pytest.raises(SurgeonError, match="unknown recipe key 'method.shotz'"):
        build_config({"model": "tiny", "method": {"shotz": 2}})
    with pytest.raises(SurgeonError, match="no model given"):
        load_recipe(None, ["shots=2"])


def test_method_options_are_validated_by_the_registry():
    spec = METHODS["wanda"]
    with pytest.raises(SurgeonError) as exc:
        cfg_of("method=wanda", "structure=unstructured", "damping_g=0.1")
    assert f"method wanda has no option 'damping_g' (its options: {', '.join(spec.options)})" in str(exc.value)
    with pytest.raises(SurgeonError, match=r"method magnitude has no option 'fisher' \(its options: coupled_score\)"):
        cfg_of("method=magnitude", "fisher=sampled")
    with pytest.raises(SurgeonError, match="does not support structured"):
        cfg_of("method=sparsegpt")
    with pytest.raises(SurgeonError, match="invalid recipe value for 'method.fisher'"):
        cfg_of("fisher=exact")
    with pytest.raises(SurgeonError, match="invalid recipe value for 'method.name': unknown method 'obs-magic'"):
        cfg_of("method=obs-magic")
    with pytest.raises(SurgeonError, match="first_order needs method llm-surgeon or kobd"):
        cfg_of("fisher=sampled", "first_order=true")
    ok = cfg_of("method=wanda", "structure=2:4", "true_sequential=true", "baseline_dtype=fp64")
    assert ok.method.options() == {"true_sequential": True, "baseline_dtype": "fp64"}
    opts = ok.options()
    assert opts.method == "wanda" and opts.true_sequential and str(opts.baseline_dtype) == "torch.float64"


def test_unquoted_n_m_in_yaml_is_the_structure(tmp_path):
    text = "model: tiny\nmethod: {name: sparsegpt, structure: 2:4}\n"
    assert yaml.safe_load(text)["method"]["structure"] == 124  # YAML 1.1 base 60: what the loader must avoid
    assert load_yaml(text)["method"]["structure"] == "2:4"
    path = tmp_path / "nm.yaml"
    path.write_text("model: tiny\nmethod: sparsegpt\nstructure: 2:4\n")
    cfg = load_recipe(path)
    assert cfg.method.structure == "2:4" and cfg.final_target == 0.5
    assert cfg_of("structure=4:8").method.structure == "4:8"
    assert cfg_of("structure=2:4", "target_size=0.7").final_target == 0.7  # a shot of a schedule towards 2:4
    with pytest.raises(SurgeonError, match="keeps at least 0.5 of the weights; target_size 0.4 is below it"):
        cfg_of("structure=2:4", "target_size=0.4")


@pytest.mark.parametrize("override,message", [
    ("device=quantum", "invalid recipe value for 'compute.device': unknown device 'quantum'"),
    ("device=cuda:x", "invalid recipe value for 'compute.device'"),
    ("damping_a=nan", "damping_a must be a non-negative number, got nan"),
    ("damping_g=-0.1", "damping_g must be a non-negative number"),
    ("threads=0", "invalid recipe value for 'compute.threads': must be at least 1, got 0"),
    ("promote_max_ppl_ratio=inf", "invalid recipe value for 'output.promote_max_ppl_ratio': must be a positive "
                                  "finite number, got inf"),
    ("promote_max_ppl_ratio=.inf", "must be a positive finite number, got inf"),
    ("target_size=1.5", "invalid recipe value for 'method.target_size'"),
    ("nsamples=0", "invalid recipe value for 'calibration.nsamples'"),
    ("eval_at=[1.5]", "invalid recipe value for 'eval.at': sizes must be in (0, 1]"),
    ("compute_dtype=fp8", "invalid recipe value for 'compute.dtype'"),
    ("finetune.holdout=1.0", "invalid recipe value for 'finetune.holdout'"),
    ("structure_report_decode_attention=flex", "is for a GPU report"),
    ("compute.shard_factors=true", "compute.shard_factors spreads the factors over the processes of a shot: it "
                                   "needs compute.nproc of 2 or more"),
    ("compute.factor_passes=0", "invalid recipe value for 'compute.factor_passes'"),
    ("compute.shard_weights=true", "compute.shard_weights spreads the weights over the processes of a shot: it "
                                   "needs compute.nproc of 2 or more"),
    ("compute.factor_storage=fp16", "invalid recipe value for 'compute.factor_storage'"),
])
def test_bad_values_are_refused_at_load(override, message):
    with pytest.raises(SurgeonError) as exc:
        cfg_of(override)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_non_finite_ratio_is_refused_from_python_too():
    with pytest.raises(SurgeonError, match="positive finite"):
        build_config({"model": "tiny", "output": {"promote_max_ppl_ratio": math.inf}})


@pytest.mark.parametrize("override", ["compute.threads=3", "compute.device=cuda", "compute.nproc=2",
                                      "compute.checkpoint_layers=true", "compute.update_concurrent=7",
                                      "compute.update_batch_layers=2", "compute.factor_passes=3",
                                      "eval.data=e.txt", "eval.seqlen=64", "eval.at=[0.9]", "eval.batch_size=8",
                                      "eval.max_windows=3", "eval.zeroshot_tasks=a", "output.path=/elsewhere",
                                      "output.overwrite=true", "output.register_model=false",
                                      "output.experiment=x", "output.promote_max_ppl_ratio=2",
                                      "finetune.lr=0.1", "finetune.train=both", "finetune.holdout=0.5",
                                      "finetune.schedule=constant"])
def test_config_hash_ignores_what_does_not_change_the_weights(override):
    base = cfg_of("shots=2", "nsamples=8")
    assert cfg_of("shots=2", "nsamples=8", override).config_hash() == base.config_hash()


@pytest.mark.parametrize("override", ["method.damping_g=0.2", "calibration.nsamples=16", "compute.dtype=bf16",
                                      "method.target_size=0.6", "method.shots=3", "method.seed=1",
                                      "method.name=kobd", "calibration.seqlen=64", "calibration.data=c.txt",
                                      "calibration.seed=1", "compute.gram_dtype=bf16", "compute.inverse_dtype=fp32",
                                      "compute.batch_size=4", "compute.model_dtype=bf16", "finetune.steps=1",
                                      "finetune.final_steps=1", "compute.solve_dtype=fp32",
                                      "compute.factor_storage=bf16"])
def test_config_hash_follows_what_changes_the_weights(override):
    base = cfg_of("shots=2", "nsamples=8")
    assert cfg_of("shots=2", "nsamples=8", override).config_hash() != base.config_hash()


def test_fields_added_later_keep_earlier_hashes():
    """A weight field added after recipes were hashed counts only away from the behaviour from before it: recipes,
    caches and output folders made before it keep their keys (the hash below is such a recipe's)."""
    base = cfg_of("shots=2", "nsamples=8")
    assert "solve_dtype" not in base.weight_payload()["compute"]
    assert cfg_of("shots=2", "nsamples=8", "compute.solve_dtype=fp64").config_hash() == base.config_hash()
    assert cfg_of("shots=2", "nsamples=8", "compute.factor_storage=fp32").config_hash() == base.config_hash()
    assert build_config({"model": "x"}).config_hash() == "9a6dc666819c2302"


def test_fine_tuning_settings_count_once_fine_tuning_runs():
    on = cfg_of("finetune.steps=2")
    assert cfg_of("finetune.steps=2", "finetune.lr=0.1").config_hash() != on.config_hash()
    # the default target size and the same size given explicitly are the same weights
    assert cfg_of("target_size=0.7").config_hash() == cfg_of().config_hash()


def test_recipe_yaml_round_trip(tmp_path):
    cfg = cfg_of("method=kobd", "structure=coupled", "shots=3", "fisher=sampled", "eval_data=e.txt",
                 "eval_at=[0.9]", "finetune_steps=2", "output=runs/x", "compute.threads=1", "zeroshot_tasks=a,b")
    recipe = cfg.recipe()
    assert list(recipe) == ["model", *SECTIONS]
    assert recipe["method"] == {"name": "kobd", "structure": "coupled", "target_size": None, "shots": 3, "seed": 0,
                                "fisher": "sampled"}
    path = tmp_path / "recipe.yaml"
    path.write_text(cfg.to_yaml())
    again = load_recipe(path)
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert build_config(yaml.safe_load(cfg.to_yaml())) == cfg
    nm = cfg_of("method=wanda", "structure=2:4")
    assert load_yaml(nm.to_yaml())["method"]["structure"] == "2:4" and build_config(load_yaml(nm.to_yaml())) == nm


def test_plan():
    layerwise = cfg_of("method=sparsegpt", "structure=unstructured", "shots=40", "target_size=0.5")
    assert layerwise.plan() == [Step(1, 1, 0.5, evaluate=True)]
    steps = cfg_of("shots=4", "target_size=0.6", "eval_data=e.txt", "eval_at=[0.8]", "finetune_steps=2",
                   "final_finetune_steps=5").plan()
    assert [s.target_size for s in steps] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert [s.evaluate for s in steps] == [False, True, False, True]
    assert [s.finetune_steps for s in steps] == [2, 2, 2, 7]
    # without evaluation data nothing is evaluated between shots
    assert [s.evaluate for s in cfg_of("shots=4", "eval_at=[0.8]").plan()] == [False, False, False, True]


def test_checkpoint_layers_recipe_key_reaches_the_shot():
    from surgeon.config import load_recipe

    cfg = load_recipe(None, ["checkpoint_layers=true"], model="some/model")
    assert cfg.compute.checkpoint_layers and cfg.options().checkpoint_layers
    assert not load_recipe(None, model="some/model").options().checkpoint_layers


def test_update_concurrent_recipe_key_reaches_the_shot_and_is_validated():
    from surgeon.config import load_recipe
    from surgeon.errors import SurgeonError

    assert load_recipe(None, ["update_concurrent=7"], model="some/model").options().update_concurrent_batches == 7
    assert load_recipe(None, model="some/model").options().update_concurrent_batches == 1
    with pytest.raises(SurgeonError, match="update_concurrent"):
        load_recipe(None, ["update_concurrent=0"], model="some/model")


def test_factor_memory_keys_reach_the_shot():
    from surgeon.config import load_recipe

    opts = load_recipe(None, ["nproc=2", "shard_factors=true", "factor_passes=4", "factor_storage=packed"],
                       model="some/model").options()
    assert (opts.shard_factors, opts.factor_passes, opts.factor_storage) == (True, 4, "packed")
    plain = load_recipe(None, model="some/model").options()
    assert (plain.shard_factors, plain.factor_passes, plain.factor_storage) == (False, 1, "fp32")
    two = cfg_of("nproc=2").config_hash()
    assert cfg_of("nproc=2", "shard_weights=true", "shard_factors=true").config_hash() == two
    for key in ("shard_factors", "shard_weights"):
        with pytest.raises(SurgeonError, match="coupled structures are solved by one process"):
            load_recipe(None, ["nproc=2", f"{key}=true", "structure=coupled"], model="some/model")


def test_every_shipped_recipe_validates():
    from pathlib import Path

    import yaml

    from surgeon.config import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[2] / "deployments" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        if "sweep" in (yaml.safe_load(path.read_text()) or {}):
            continue  # a sweep file (surgeon sweep) names a recipe and its grid, not a recipe itself
        load_recipe(path)
