"""Reliability of `surgeon prune` and its Python API on a tiny random Llama (docs/reliability.md lists every case).

- bad input: each case gives one line ``error: ...`` naming the problem and exit status 2 through the CLI, the
  same message as a SurgeonError through the Python API, nothing written (no output, lock, JSON or MLflow run),
  and the source model unchanged (sha256 of every file);
- outputs: manifest with hashes and the resolved recipe, ``surgeon verify`` (OK / each difference, exit 1), the
  output policy (same recipe replaced, another refused unless overwrite), one writer per output folder (a second
  run is refused; a run killed with SIGKILL leaves no half-written output and a stale lock that is taken over);
- concurrency: two processes registering versions of one registered model at once in one MLflow
  (tests/flows/test_tracking_concurrency.py);
- determinism: the same recipe and seed give identical masks and weights on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from surgeon.config import load_recipe
from surgeon.errors import SurgeonError
from surgeon.outputs import lock_path, output_lock
from surgeon.runner import run
from surgeon.utils import sha256_file
from tiny_io import run_inputs, surgeon

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return run_inputs(tmp_path_factory.mktemp("reliability"))


def recipe(inputs, output, **kw) -> dict:
    """A flat recipe (the names of the sectioned fields that are unique, or name their usual section)."""
    return {"model": str(inputs["model"]), "calibration": str(inputs["text"]), "nsamples": 4, "seqlen": 16,
            "shots": 1, "target_size": 0.8, "threads": 1, "register_model": False,
            **({"output": str(output)} if output is not None else {}), **kw}


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p, use_cache=False)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = surgeon(*args)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------- bad input

def _bad_models(root: Path, good: Path) -> dict[str, Path]:
    models = {}
    models["no weights"] = copy_model(good, root / "m-noweights")
    (models["no weights"] / "model.safetensors").unlink()
    models["truncated"] = copy_model(good, root / "m-truncated")
    data = (good / "model.safetensors").read_bytes()
    (models["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    models["bad config"] = copy_model(good, root / "m-badconfig")
    (models["bad config"] / "config.json").write_text("{not json")
    models["gpt2"] = copy_model(good, root / "m-gpt2")
    cfg = json.loads((good / "config.json").read_text())
    (models["gpt2"] / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        models[name] = copy_model(good, root / f"m-{name}")
        tensors = load_file(str(good / "model.safetensors"))
        key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
        tensors[key][0, 0] = value
        save_file(tensors, str(models[name] / "model.safetensors"), metadata={"format": "pt"})
    models["grown tokenizer"] = copy_model(good, root / "m-grown")  # 128 embeddings, a tokenizer of 5200 tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(good, trust_remote_code=False)
    tok.add_tokens([f"extra{i}" for i in range(5200 - len(tok))])
    tok.save_pretrained(models["grown tokenizer"])
    return models


def bad_cases(inputs, root: Path) -> dict[str, tuple[dict, list[str], str]]:
    """name -> (recipe changes, extra CLI arguments, expected part of the message)."""
    models = _bad_models(root, inputs["model"])
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("The quick brown fox.")
    np.save(root / "big.npy", np.array([1, 2, 5000, 3] * 40))
    np.save(root / "windows8.npy", np.arange(32).reshape(4, 8) % 100)
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    (root / "other").mkdir()
    (root / "other" / "manifest.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "files": {}}))
    (root / "afile").write_text("x")
    np.save(root / "u64.npy", np.array([1, 2, 2**64 - 1, 3] * 40, dtype=np.uint64))
    (root / "numbers.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(400)))
    return {
        "target size above 1": ({"target_size": 1.5}, [], "invalid recipe value for 'method.target_size'"),
        "target size 0": ({"target_size": 0}, [], "invalid recipe value for 'method.target_size'"),
        "unknown method": ({"method": "obs-magic"}, [], "invalid recipe value for 'method.name'"),
        "option of another method": ({"method": "magnitude", "damping_g": 0.1}, [],
                                     "method magnitude has no option 'damping_g'"),
        "unknown structure": ({"structure": "diagonal"}, [], "unknown structure 'diagonal'"),
        "N:M below its target size": ({"structure": "2:4", "target_size": 0.4}, [], "is below it"),
        "N:M not dividing the inputs": ({"structure": "2:7", "target_size": None}, [], "divisible by 7"),
        "structured with a layer-wise method": ({"method": "wanda", "structure": "structured"}, [],
                                                "does not support structured"),
        "flex decode attention for a CPU report": ({"structure_report_decode_attention": "flex"}, [],
                                                    "is for a GPU report"),
        "nsamples 0": ({"nsamples": 0}, [], "invalid recipe value for 'calibration.nsamples'"),
        "unknown compute dtype": ({"compute_dtype": "fp8"}, [], "invalid recipe value for 'compute.dtype'"),
        "eval_at out of range": ({"eval_at": [1.5]}, [], "invalid recipe value for 'eval.at': sizes must be in (0, 1]"),
        "unknown device": ({"device": "quantum"}, [], "unknown device 'quantum'"),
        "ambiguous bare name": ({"split": "test"}, [], "recipe key 'split' is ambiguous"),
        "missing model": ({"model": str(root / "nope")}, [], "model path not found"),
        "model folder without weights": ({"model": str(models["no weights"])}, [], "no weight files"),
        "truncated safetensors": ({"model": str(models["truncated"])}, [], "corrupt or truncated safetensors"),
        "corrupt config.json": ({"model": str(models["bad config"])}, [], "cannot read"),
        "unsupported architecture": ({"model": str(models["gpt2"])}, [], "unsupported architecture 'gpt2'"),
        "NaN weights": ({"model": str(models["nan"])}, [], "model weights hold NaN/Inf"),
        "Inf weights": ({"model": str(models["inf"])}, [], "model weights hold NaN/Inf"),
        "missing calibration file": ({"calibration": str(root / "nope.txt")}, [], "data file not found"),
        "empty corpus": ({"calibration": str(root / "empty.txt")}, [], "corpus is empty"),
        "corpus shorter than nsamples x seqlen": ({"calibration": str(root / "short.txt")}, [],
                                                  "fewer than nsamples x seqlen"),
        "seqlen beyond the context": ({"seqlen": 512}, [], "beyond the model's context of 256"),
        "eval seqlen beyond the context": ({"eval_data": str(inputs["text"]), "eval_seqlen": 300}, [],
                                           "beyond the model's context of 256"),
        "token ids beyond the vocabulary": ({"calibration": str(root / "big.npy")}, [], "beyond the tokenizer's"),
        "windows of another length": ({"calibration": str(root / "windows8.npy")}, [],
                                      "calibration windows have 8 tokens"),
        "non-empty output folder": ({"output": str(root / "busy")}, [], "is not empty and is not a surgeon output"),
        "output of another recipe": ({"output": str(root / "other")}, [], "holds a pruned model of another recipe"),
        "output under a file": ({"output": str(root / "afile" / "out")}, [], "is not a folder"),
        "unknown recipe key": ({"shotz": 2}, [], "unknown recipe key 'shotz'"),
        "bad override": ({}, ["shots"], "override must look like key=value"),
        "threads 0": ({"threads": 0}, [], "invalid recipe value for 'compute.threads'"),
        "damping_a NaN": ({"damping_a": float("nan")}, [], "damping_a must be a non-negative number"),
        "uint64 token ids beyond int64": ({"calibration": str(root / "u64.npy")}, [], "beyond any vocabulary"),
        "token ids beyond the embedding": ({"model": str(models["grown tokenizer"]),
                                            "calibration": str(root / "big.npy")}, [],
                                           "beyond the model's embedding of 128 tokens"),
        "non-text data column": ({"calibration": str(root / "numbers.jsonl")}, [], "not text"),
        "/dev/zero as data": ({"calibration": "/dev/zero"}, [], "is not a regular file"),
        "245-character output name": ({"output": str(root / ("x" * 245))}, [], "name too long"),
        "model_name with a slash": ({"model_name": "team/a"}, [], "invalid recipe value for 'output.model_name'"),
        "infinite promotion-gate ratio": ({"promote_max_ppl_ratio": float("inf")}, [],
                                          "invalid recipe value for 'output.promote_max_ppl_ratio'"),
    }


RAW_RECIPES = {  # recipe files that are not valid YAML mappings
    "malformed recipe YAML": ("model: [unclosed\nshots: 2\n", "malformed recipe YAML"),
    "recipe not a mapping": ("- model\n- shots\n", "must be a mapping"),
}


@pytest.mark.heavy
def test_bad_input_cli_and_api_one_line_nothing_written_model_untouched(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = folder_hashes(inputs["model"])
    cases = bad_cases(inputs, tmp_path)
    out = tmp_path / "out"
    seen = 0
    for name, (changes, extra, message) in [*cases.items(), *((n, (None, [], m)) for n, (_, m) in RAW_RECIPES.items())]:
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        if changes is None:
            path.write_text(RAW_RECIPES[name][0])
        else:
            path.write_text(yaml.safe_dump({k: v for k, v in {**recipe(inputs, out), **changes}.items()
                                            if v is not None}))
        target = Path(yaml.safe_load(path.read_text())["output"]) if changes is not None else out  # flat: a path
        existed = target.exists() and folder_hashes(target)
        js = tmp_path / "result.json"
        rc, stdout, err = cli(capsys, "prune", "--config", path, *extra, "--json", js)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2, (name, err)
        assert len(errors) == 1 and message in errors[0], (name, err)
        assert err.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in err, name
        assert not js.exists() and not out.exists() and not lock_path(target).exists(), name
        assert (folder_hashes(target) if target.exists() else False) == existed, name  # a busy output untouched
        # the Python API: the same message, as a SurgeonError
        with pytest.raises(SurgeonError) as exc:
            run(load_recipe(path, extra))
        assert f"error: {exc.value}" == errors[0], name
        assert not out.exists() and not lock_path(target).exists(), name
        seen += 1
    assert seen >= 40
    assert folder_hashes(inputs["model"]) == before
    assert not (tmp_path / "mlflow.db").exists()  # no run was started


def test_json_output_is_a_folder(inputs, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    rc, out, err = cli(capsys, "prune", "--model", inputs["model"], "--calibration", inputs["text"], "--nsamples", 4,
                       "--seqlen", 16, "--output", tmp_path / "o", "--json", tmp_path / "adir")
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: output path is a folder")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_parent(inputs, tmp_path, capsys, monkeypatch):
    """An output whose nearest existing folder is not writable: one line ``error: ...`` (exit 2) through the CLI,
    the same SurgeonError through the API, nothing created. ``os.access`` (as surgeon.outputs looks it up) says the
    folder is not writable, so this runs as root too (root may write into a mode-0500 folder)."""
    import surgeon.outputs as outputs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    real_access = os.access
    asked = []

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == ro.resolve() and mode & os.W_OK:
            asked.append(path)
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "access", access)
    message = f"cannot create output {ro / 'out'}: {ro} is not writable"
    rc, _, err = cli(capsys, "prune", "--model", inputs["model"], "--calibration", inputs["text"], "--nsamples", 4,
                     "--seqlen", 16, "--output", ro / "out", "--json", tmp_path / "result.json")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and errors == [f"error: {message}"], err
    assert err.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in err
    with pytest.raises(SurgeonError) as exc:
        run(load_recipe(None, [], **recipe(inputs, ro / "out")))
    assert str(exc.value) == message
    assert asked and not list(ro.iterdir()) and not (tmp_path / "result.json").exists()
    assert not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------------------------------------------- outputs

@pytest.fixture(scope="module")
def pruned(inputs) -> Path:
    out = inputs["root"] / "pruned"
    run(load_recipe(None, [], **recipe(inputs, out, shots=2, eval_data=str(inputs["text"]), eval_max_windows=2)))
    return out


def test_manifest_carries_hashes_and_resolved_recipe(pruned, inputs):
    manifest = json.loads((pruned / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in pruned.iterdir() if p.name != "manifest.json"}
    assert all(manifest["files"][n] == sha256_file(pruned / n, use_cache=False) for n in manifest["files"])
    assert manifest["recipe"] == yaml.safe_load((pruned / "recipe.yaml").read_text())
    assert manifest["recipe"]["method"]["shots"] == 2 and manifest["config_hash"]
    assert load_recipe(pruned / "recipe.yaml").config_hash() == manifest["config_hash"]
    assert not list(pruned.parent.glob(".pruned.*"))  # no temporary folder or lock left beside it


def test_verify_ok_and_every_kind_of_difference(pruned, tmp_path, capsys):
    rc, out, err = cli(capsys, "verify", pruned)
    assert rc == 0 and out.startswith(f"OK {pruned}") and "weights finite" in out

    def tampered(name, change) -> tuple[int, str, str]:
        copy = copy_model(pruned, tmp_path / name)
        change(copy)
        return cli(capsys, "verify", copy)

    def flip_byte(folder):
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (folder / "model.safetensors").write_bytes(bytes(data))

    def refresh(folder, name):  # a consistent manifest entry: only the deeper check can notice
        m = json.loads((folder / "manifest.json").read_text())
        m["files"][name] = sha256_file(folder / name, use_cache=False)
        (folder / "manifest.json").write_text(json.dumps(m))

    def edit_recipe(folder):
        r = yaml.safe_load((folder / "recipe.yaml").read_text())
        r["method"]["target_size"] = 0.5
        (folder / "recipe.yaml").write_text(yaml.safe_dump(r))
        refresh(folder, "recipe.yaml")

    def nan_weights(folder):
        t = load_file(str(folder / "model.safetensors"))
        key = next(iter(t))
        t[key].view(-1)[0] = float("nan")
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
        refresh(folder, "model.safetensors")

    expected = {
        "flipped": (flip_byte, "model.safetensors differs"),
        "extra": (lambda f: (f / "notes.txt").write_text("x"), "unexpected file notes.txt"),
        "missing": (lambda f: (f / "tokenizer.json").unlink(), "missing file tokenizer.json"),
        "recipe": (edit_recipe, "recipe.yaml gives config hash"),
        "nan": (nan_weights, "holds NaN/Inf"),
    }
    for name, (change, message) in expected.items():
        rc, out, err = tampered(name, change)
        assert rc == 1, (name, out, err)
        assert any(line.startswith("MISMATCH") and message in line for line in out.splitlines()), (name, out)
        assert err.strip().startswith("error:") and "does not match its manifest" in err, name
    rc, out, err = cli(capsys, "verify", tmp_path / "extra" / "..")
    assert rc == 2 and "no manifest.json" in err


def test_output_policy_same_recipe_replaced_other_refused_unless_overwrite(pruned, inputs, capsys):
    before = weights(pruned)
    same = recipe(inputs, pruned, shots=2, eval_data=str(inputs["text"]), eval_max_windows=2)
    run(load_recipe(None, [], **same))  # rerunning the finished command: allowed, identical result
    assert all(torch.equal(before[k], v) for k, v in weights(pruned).items())
    with pytest.raises(SurgeonError, match="another recipe"):
        run(load_recipe(None, [], **{**same, "target_size": 0.9}))
    assert all(torch.equal(before[k], v) for k, v in weights(pruned).items())
    rc, out, err = cli(capsys, "verify", pruned)
    assert rc == 0


def test_overwrite_is_explicit(inputs, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["prune", "--model", inputs["model"], "--calibration", inputs["text"], "--nsamples", 4, "--seqlen", 16,
            "--target-size", 0.9, "--output", out, "--no-register", "threads=1"]
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "pass --overwrite" in err and (out / "notes.txt").exists()
    with pytest.raises(SurgeonError, match="pass --overwrite"):
        run(load_recipe(None, [], **recipe(inputs, out, target_size=0.9)))
    run(load_recipe(None, ["output.overwrite=true"], **recipe(inputs, out, target_size=0.9)))
    assert not (out / "notes.txt").exists() and cli(capsys, "verify", out)[0] == 0


_RUN = """
import sys, time
from surgeon.config import load_recipe
from surgeon.runner import run

def on_step(row):
    print(f"step {row['shot']} done", file=sys.stderr, flush=True)
    if row["shot"] == 2:  # the middle of a long run (later shots, export): it is killed here
        time.sleep(300)

run(load_recipe(sys.argv[1]), on_step=on_step)
"""


@pytest.mark.heavy
def test_second_writer_refused_kill_leaves_nothing_and_stale_lock_is_taken_over(inputs, tmp_path):
    out = tmp_path / "shared-out"
    slow = tmp_path / "slow.yaml"  # several shots: the run is killed after its second one, weights in memory
    slow.write_text(yaml.safe_dump(recipe(inputs, out, shots=4, nsamples=16, target_size=0.6)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "run.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _RUN, str(slow)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not (
                lock_path(out).exists() and lock_path(out).stat().st_size):  # the holder has written its name
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-2000:]
        holder = json.loads(lock_path(out).read_text())
        assert holder["pid"] == proc.pid
        # a second run to the same output is refused at once, naming the holder
        with pytest.raises(SurgeonError, match=f"being written by another run \\(pid {proc.pid} on "):
            run(load_recipe(None, [], **recipe(inputs, out, target_size=0.9)))
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and "step 2 done" not in log.read_text():
            time.sleep(0.05)
        assert proc.poll() is None and "step 2 done" in log.read_text(), log.read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)  # the first run dies in the middle of its work
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not list(tmp_path.glob(".shared-out.*.partial"))  # nothing half-written
    assert lock_path(out).exists()  # stale: its process is gone, the kernel released the lock
    run(load_recipe(None, [], **recipe(inputs, out, target_size=0.9)))
    assert not lock_path(out).exists()
    assert json.loads((out / "manifest.json").read_text())["recipe"]["method"]["target_size"] == 0.9


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with output_lock(tmp_path / "o"):
        with pytest.raises(SurgeonError, match="being written by another run"):
            with output_lock(tmp_path / "o"):
                pass
    with output_lock(tmp_path / "o"):  # released: can be taken again
        pass


# ----------------------------------------------------------------------------------------------- determinism

@pytest.mark.heavy
def test_same_recipe_and_seed_identical_masks_and_weights(inputs, tmp_path):
    base = recipe(inputs, None, structure="unstructured", shots=2, fisher="sampled", seed=3, target_size=0.6)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("other-seed", 4)):
        run(load_recipe(None, [], **{**base, "seed": seed, "output": str(tmp_path / name)}))
        runs[name] = weights(tmp_path / name)
    a, b, c = runs["a"], runs["b"], runs["other-seed"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in a)  # masks
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, bit for bit
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters (sampled Fisher labels)


# ----------------------------------------------------------------------------------------------- the source model

@pytest.mark.heavy
def test_output_that_is_contains_is_inside_or_links_to_the_source_is_refused_even_with_overwrite(inputs, tmp_path,
                                                                                               capsys):
    """The source model is never destroyed: an output that is the model folder, links to it, contains it or lies
    inside it is refused with or without --overwrite (recipe ``output.overwrite: true``), before any work."""
    parent = tmp_path / "models"
    model = copy_model(inputs["model"], parent / "tiny")
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    (tmp_path / "parent-link").symlink_to(parent, target_is_directory=True)
    before = folder_hashes(parent)
    outputs = {"the model": model, "a link to it": tmp_path / "link", "its parent": parent,
               "a link to its parent": tmp_path / "parent-link", "inside it": model / "pruned",
               "inside it through a link": tmp_path / "link" / "sub" / "pruned"}
    for name, out in outputs.items():
        r = recipe(inputs, out, model=str(model))
        with pytest.raises(SurgeonError, match="source model") as exc:
            run(load_recipe(None, ["output.overwrite=true"], **r))
        assert "would overwrite or delete" in str(exc.value), name
        rc, _, err = cli(capsys, "prune", "--model", model, "--calibration", inputs["text"], "--nsamples", 4,
                         "--seqlen", 16, "--output", out, "--overwrite", "--no-register", "threads=1")
        assert rc == 2 and "source model" in err.strip().splitlines()[-1], (name, err)
        assert folder_hashes(parent) == before, name


def test_export_refuses_weights_that_missed_the_target_size(inputs, tmp_path):
    """The size of the weights being exported is compared with the recipe's target: weights that missed it (here
    the unpruned model, size 1.0, against a 0.7 target) fail with a clear error and nothing is written."""
    from surgeon.inputs import ModelRef
    from surgeon.runner import SIZE_TOLERANCE, export

    cfg = load_recipe(None, [], **recipe(inputs, tmp_path / "out", target_size=0.7))
    with pytest.raises(SurgeonError, match=r"size 1\.0000 .*target 0\.7000") as exc:
        export(str(inputs["model"]), str(tmp_path / "out"), cfg, {}, ModelRef(str(inputs["model"]), "hash"))
    assert f"tolerance {SIZE_TOLERANCE}" in str(exc.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_model_identity_is_by_content_not_by_path_size_and_mtime(inputs, tmp_path):
    """A same-size weights file swapped in with the old modification time gets a new content hash (the cache key
    of every shot and the manifest's source hash), so no earlier result is reused for it."""
    from surgeon.models import model_content_hash

    model = copy_model(inputs["model"], tmp_path / "m")
    before = model_content_hash(model)
    f = model / "model.safetensors"
    st = f.stat()
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("mlp.down_proj.weight"))
    t[key][0, 0] += 1.0
    save_file(t, str(f), metadata={"format": "pt"})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert model_content_hash(model) != before
    assert sha256_file(f) == sha256_file(f, use_cache=False)  # the cached file hash notices the swap too


# ----------------------------------------------------------------------------------------------- faults, more

def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_path(tmp_path / "o").symlink_to(victim)
    with pytest.raises(SurgeonError, match="symbolic link"):
        with output_lock(tmp_path / "o"):
            pass
    assert victim.read_text() == "precious" and lock_path(tmp_path / "o").is_symlink()


def test_partial_folders_of_a_killed_export_are_removed_by_the_next_run(inputs, tmp_path):
    """``kill -9`` while an export writes leaves ``.OUT.*.partial`` (and ``.OUT.*.old``) beside the output; the
    next run to that output (holding its lock: no writer is alive) removes them."""
    out = tmp_path / "out"
    left = [tmp_path / ".out.k1ll3d.partial", tmp_path / ".out.0ld.old"]
    for d in left:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    other = tmp_path / ".other.x.partial"  # another output's: not this run's to remove
    other.mkdir()
    run(load_recipe(None, [], **recipe(inputs, out)))
    assert not any(d.exists() for d in left) and other.is_dir() and (out / "manifest.json").is_file()


def test_corrupt_cached_calibration_windows_are_rebuilt_with_a_warning(inputs, tmp_path, caplog):
    import logging

    from surgeon.inputs import build_calibration, load_windows

    cfg = load_recipe(None, [], **recipe(inputs, None, seed=21))
    first = build_calibration(cfg, str(inputs["model"]))
    good = load_windows(first.path)
    Path(first.path).write_bytes(b"\x93NUMPY garbage")
    caplog.set_level(logging.WARNING)
    again = build_calibration(cfg, str(inputs["model"]))
    assert again.data_id == first.data_id and torch.equal(load_windows(again.path), good)
    assert "rebuilding" in caplog.text


def test_corrupt_checkpoint_of_an_in_process_run_is_recomputed_with_a_warning(inputs, tmp_path, caplog):
    import logging

    ck = tmp_path / "ck"
    r = recipe(inputs, tmp_path / "a", shots=2, target_size=0.7)
    run(load_recipe(None, [], **r), checkpoint=ck)
    ref = weights(tmp_path / "a")
    data = bytearray((ck / "model.safetensors").read_bytes())
    (ck / "model.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    caplog.set_level(logging.WARNING)
    run(load_recipe(None, [], **{**r, "output": str(tmp_path / "b")}), checkpoint=ck)
    assert "recomputing" in caplog.text
    assert all(torch.equal(ref[k], v) for k, v in weights(tmp_path / "b").items())


def test_full_disk_during_export_is_one_clear_error_and_nothing_half_written(inputs, tmp_path, monkeypatch):
    import errno

    import surgeon.models as models

    real = models.atomic_write

    def full(path, data):
        if Path(path).name == "layer_sizes.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(models, "atomic_write", full)
    with pytest.raises(SurgeonError, match="No space left on device"):
        run(load_recipe(None, [], **recipe(inputs, tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_json_inside_the_output_or_read_only_is_refused_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    import surgeon_cli.common as common

    args = ["prune", "--model", inputs["model"], "--calibration", inputs["text"], "--nsamples", 4, "--seqlen", 16,
            "--output", tmp_path / "out", "--no-register", "threads=1"]
    rc, _, err = cli(capsys, *args, "--json", tmp_path / "out" / "result.json")
    assert rc == 2 and "inside the output folder" in err.strip().splitlines()[-1], err
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode, *a, **k: False if Path(p).resolve() == ro.resolve()
                        and mode & os.W_OK else real_access(p, mode, *a, **k))
    rc, _, err = cli(capsys, *args, "--json", ro / "result.json")
    assert rc == 2 and "not writable" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_forged_token_cache_and_validation_marker_are_not_trusted(inputs, tmp_path):
    """Entries someone else wrote into the cache (no valid MAC) are ignored: a token cache file holding other ids
    is recomputed, and a 'validated' marker for a model with NaN weights does not skip the model check."""
    import surgeon.data as D
    from surgeon.inputs import validate_model
    from surgeon.models import model_content_hash
    from surgeon.utils import cache_dir

    tok = __import__("tiny_io").tiny_tokenizer()
    text = "A text that nobody has tokenized before, with a few words."
    ids = D.tokenize(tok, text)
    for f in cache_dir("tokens").glob("*.npy"):
        np.save(f, np.zeros(7, dtype=np.int32))  # a forged entry: other ids
    assert torch.equal(D.tokenize(tok, text), ids)

    bad = _bad_models(tmp_path, inputs["model"])["nan"]
    content = model_content_hash(bad)
    cfg = load_recipe(None, [], **recipe(inputs, None, model=str(bad)))
    name = f"{content[:32]}-{cfg.method.structure.replace(':', 'of')}"
    (cache_dir("validated") / name).write_text(str(bad))  # a marker as an unsigned format would hold it
    (cache_dir("validated") / f"{name}.json").write_text(json.dumps(
        {"format": "surgeon-cache-record/1", "key": f"validated-{content}-{cfg.method.structure}",
         "value": {"model": str(bad)}, "files": {}, "mac": "0" * 64}))
    with pytest.raises(SurgeonError, match="NaN/Inf"):
        validate_model(str(bad), cfg, content)


def test_huge_finite_weights_fail_clearly_and_export_nothing(inputs, tmp_path):
    """Weights of 1e30 (finite) overflow the curvature even in fp32: one clear SurgeonError, no output, instead of a
    pruned model that missed its target or an internal error."""
    model = copy_model(inputs["model"], tmp_path / "huge")
    t = load_file(str(model / "model.safetensors"))
    for k in t:
        if k.endswith("proj.weight"):
            t[k] = t[k] * 1e30
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match="overflow"):
        run(load_recipe(None, [], **recipe(inputs, tmp_path / "out", model=str(model), target_size=0.7)))
    assert not (tmp_path / "out").exists()
