"""surgeon.launcher: a shot with compute.nproc=2 runs under torchrun (gloo on the CPU, surgeon.shot_worker) and gives
one process's masks; nproc errors are one line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tiny_models import tiny_windows

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def _masks(folder) -> dict[str, torch.Tensor]:
    """The zero masks of the decoder weights in a checkpoint (one file, or the files of its index)."""
    from safetensors.torch import load_file

    return {k: v == 0 for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items() if "layers" in k}


@pytest.mark.parametrize("factors", [[], ["compute.shard_factors=true", "compute.factor_passes=2",
                                           "compute.factor_storage=packed"], ["compute.shard_weights=true"]],
                         ids=["replicated", "sharded factors", "sharded weights"])
def test_nproc_shot_runs_under_torchrun_with_the_same_masks(tmp_path, factors):
    """prune_step_dir with compute.nproc=2 launches torchrun (gloo, surgeon.shot_worker); its checkpoint has one
    process's masks, with the factors replicated or sharded (packed, in layer-block passes), or the weights sharded
    (FSDP2; the checkpoint gathers them whole)."""
    import numpy as np

    from surgeon.config import load_recipe
    from surgeon.runner import prune_step_dir
    from tiny_io import save_tiny

    model = save_tiny(tmp_path / "tiny")
    calib = tmp_path / "calib.npy"
    np.save(calib, tiny_windows(4, 16).numpy().astype(np.int32))
    recipe = dict(model=str(model), nsamples=4, seqlen=16, shots=2, target_size=0.7, threads=1)
    cfg = load_recipe(None, **recipe)
    step = cfg.plan()[0]
    one = prune_step_dir(cfg, str(model), str(calib), step, str(tmp_path / "one"))
    seen = []
    cfg2 = load_recipe(None, ["compute.nproc=2", *factors], **recipe)
    assert cfg2.plan()[0] == step and (factors or cfg2.config_hash() == cfg.config_hash())
    two = prune_step_dir(cfg2, str(model), str(calib), step, str(tmp_path / "two"),
                         progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert two["achieved_size"] == one["achieved_size"] < 0.9
    assert "allreduce" in two["seconds"] and "broadcast" in two["seconds"]
    assert {p for p, _, _ in seen} >= {"curvature", "costs", "update"}  # rank 0's progress reached the caller
    m1, m2 = _masks(tmp_path / "one"), _masks(tmp_path / "two")
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    if "compute.shard_weights=true" in factors:  # every rank wrote its slices: two files, loadable as one model
        from surgeon.models import load_model

        assert len(list((tmp_path / "two").glob("model-0000?-of-00002.safetensors"))) == 2
        assert not (tmp_path / "two" / "sharded").exists() and (tmp_path / "two" / "state.json").is_file()
        loaded, _, _ = load_model(tmp_path / "two")
        assert all(torch.equal(p == 0, m1[n]) for n, p in loaded.named_parameters() if n in m1)


def test_nproc_errors_are_one_line(tmp_path, capsys):
    from surgeon.config import load_recipe
    from surgeon.errors import SurgeonError
    from tiny_io import save_tiny, surgeon

    model = save_tiny(tmp_path / "tiny")
    cores = len(os.sched_getaffinity(0))
    rc = surgeon("prune", "--model", model, f"compute.nproc={cores + 1}", f"nsamples={cores + 1}")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err == f"error: compute.nproc={cores + 1} exceeds the {cores} CPU cores available to this process"
    if not torch.cuda.is_available():
        rc = surgeon("prune", "--model", model, "--device", "cuda", "nproc=2")
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and err.startswith("error: compute.nproc=2 needs 2 GPUs (one per process) but 0 are visible")
    with pytest.raises(SurgeonError, match="method magnitude has none"):
        load_recipe(None, model=str(model), method="magnitude", nproc=2)
    with pytest.raises(SurgeonError, match="at least one calibration window per process"):
        load_recipe(None, model=str(model), nsamples=2, nproc=4)


def test_evaluation_on_sharded_weights_gives_one_process_perplexity(tmp_path):
    """evaluate_dir with compute.shard_weights and nproc=2 runs under torchrun: each process reads its slices of the
    weights and evaluates its share of the windows (an odd count: one rank runs a padding pass)."""
    import numpy as np

    from surgeon.config import load_recipe
    from surgeon.runner import evaluate_dir
    from tiny_io import save_tiny

    model = save_tiny(tmp_path / "tiny")
    windows = tmp_path / "eval.npy"
    np.save(windows, tiny_windows(5, 16, seed=2).numpy().astype(np.int32))
    recipe = dict(model=str(model), nsamples=4, seqlen=16, threads=1)
    one = evaluate_dir(str(model), str(windows), load_recipe(None, ["eval.batch_size=2"], **recipe))
    seen = []
    two = evaluate_dir(str(model), str(windows), load_recipe(None, ["eval.batch_size=2", "compute.nproc=2",
                                                                   "compute.shard_weights=true"], **recipe),
                       progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert two["windows"] == one["windows"] == 5 and two["tokens"] == one["tokens"]
    assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
    assert ("eval", 3, 3) in seen  # rank 0's share, reported through the launcher


def test_a_random_architecture_shot_on_sharded_weights(tmp_path):
    """A random:ARCH model with compute.shard_weights is drawn in slices by each process (never whole) and pruned."""
    import numpy as np

    from safetensors import safe_open

    from surgeon.config import load_recipe
    from surgeon.runner import prune_step_dir

    calib = tmp_path / "calib.npy"
    np.save(calib, tiny_windows(2, 16).numpy().astype(np.int32))
    cfg = load_recipe(None, ["compute.nproc=2", "compute.shard_weights=true"], model="random:smollm2-135m",
                      nsamples=2, seqlen=16, shots=1, target_size=0.95, threads=1)
    report = prune_step_dir(cfg, cfg.model, str(calib), cfg.plan()[0], str(tmp_path / "ckpt"))
    assert abs(report["achieved_size"] - 0.95) < 1e-3
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(tmp_path / "ckpt" / index["model.layers.0.mlp.up_proj.weight"], framework="pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [1536, 576]


def test_a_failed_sharded_evaluation_is_one_error(tmp_path):
    from surgeon.config import load_recipe
    from surgeon.errors import SurgeonError
    from surgeon.runner import evaluate_dir
    from tiny_io import save_tiny

    model = save_tiny(tmp_path / "tiny")
    cfg = load_recipe(None, ["compute.nproc=2", "compute.shard_weights=true"], model=str(model), nsamples=4,
                      seqlen=16, threads=1)
    with pytest.raises(SurgeonError, match="sharded evaluation over 2 processes failed"):
        evaluate_dir(str(model), str(tmp_path / "missing.npy"), cfg)
