"""`benchmarks/protocol.py --checkpoint`: a multi-shot run stopped after some shots and run again with the same
arguments resumes after the last finished shot and ends with the same weights and numbers as an uninterrupted run;
a checkpoint of another run is refused."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "protocol.py"


def _run(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), "--model", str(tmp / "model"), "--calibration", str(tmp / "calib.npy"),
            "--eval", str(tmp / "eval.npy"), "--structure", "unstructured", "--target-size", "0.7", "--shots", "3",
            "--eval-at", "0.8", "--device", "cpu", "--threads", "1", *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    tiny_model("llama", seed=0).save_pretrained(tmp / "model")
    rng = np.random.default_rng(0)
    np.save(tmp / "calib.npy", rng.integers(0, VOCAB, size=(4, 32)).astype(np.int32))
    np.save(tmp / "eval.npy", rng.integers(0, VOCAB, size=(4, 32)).astype(np.int32))
    return tmp


def _final_weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def test_resumed_run_equals_an_uninterrupted_one(setup):
    tmp = setup
    full = _run(tmp, "--checkpoint", str(tmp / "full"), "--json", str(tmp / "full.json"))
    assert full.returncode == 0, full.stderr
    part = _run(tmp, "--checkpoint", str(tmp / "part"), "--max-shots", "2", "--json", str(tmp / "part.json"))
    assert part.returncode == 0, part.stderr
    assert json.loads((tmp / "part" / "state.json").read_text())["shot"] == 2
    resumed = _run(tmp, "--checkpoint", str(tmp / "part"), "--json", str(tmp / "resumed.json"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after shot 2" in resumed.stdout

    a, b = _final_weights(tmp / "full"), _final_weights(tmp / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = json.loads((tmp / "full.json").read_text()), json.loads((tmp / "resumed.json").read_text())
    assert [r["shot"] for r in rb["shots_report"]] == [1, 2, 3]
    assert [r.get("ppl") for r in rb["shots_report"]] == [r.get("ppl") for r in ra["shots_report"]]
    assert rb["dense_ppl"] == ra["dense_ppl"] and rb["resumed"][0]["after_shot"] == 2


def test_checkpoint_of_another_run_is_refused(setup):
    tmp = setup
    first = _run(tmp, "--checkpoint", str(tmp / "other"), "--max-shots", "1")
    assert first.returncode == 0, first.stderr
    args = [sys.executable, str(SCRIPT), "--model", str(tmp / "model"), "--calibration", str(tmp / "calib.npy"),
            "--eval", str(tmp / "eval.npy"), "--structure", "unstructured", "--target-size", "0.5", "--shots", "3",
            "--device", "cpu", "--threads", "1", "--checkpoint", str(tmp / "other")]
    other = subprocess.run(args, capture_output=True, text=True, cwd=tmp)
    assert other.returncode != 0 and "holds another run" in other.stderr and "target_size" in other.stderr


def test_interleaved_finetuning_keeps_masks_and_resumes_exactly(setup):
    """--finetune-steps: the weights move between shots (so the run differs from one without it), every pruned
    weight stays exactly 0, and a resumed run ends with the same weights as an uninterrupted one."""
    tmp = setup
    ft = ("--finetune-steps", "2", "--finetune-lr", "1e-3")
    full = _run(tmp, *ft, "--checkpoint", str(tmp / "ft_full"), "--json", str(tmp / "ft_full.json"))
    assert full.returncode == 0, full.stderr
    part = _run(tmp, *ft, "--checkpoint", str(tmp / "ft_part"), "--max-shots", "1")
    assert part.returncode == 0, part.stderr
    resumed = _run(tmp, *ft, "--checkpoint", str(tmp / "ft_part"))
    assert resumed.returncode == 0 and "after shot 1" in resumed.stdout, resumed.stderr
    a, b = _final_weights(tmp / "ft_full"), _final_weights(tmp / "ft_part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = _run(tmp, "--checkpoint", str(tmp / "ft_plain"))
    assert plain.returncode == 0, plain.stderr
    c = _final_weights(tmp / "ft_plain")
    lin = [k for k in a if k.endswith("proj.weight") and ".layers." in k]
    assert lin and any(not torch.equal(a[k], c[k]) for k in lin)  # the correction changed the kept weights
    for k in lin:  # about the same sparsity per linear (the script exits non-zero if a pruned weight moved)
        assert abs(float((a[k] == 0).float().mean()) - float((c[k] == 0).float().mean())) < 0.05
    rows = json.loads((tmp / "ft_full.json").read_text())["shots_report"]
    assert [len(r["interleaved"]) > 0 for r in rows] == [True, True, True]
