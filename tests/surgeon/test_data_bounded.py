"""Evaluation windows tokenize only what they need: a huge one-line text evaluated on a few short windows reads and
tokenizes a prefix of it, so memory is bounded by the windows asked for, not by the file; the windows are those of
a full tokenization."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgeon import data as D
from tiny_io import synthetic_prose, tiny_tokenizer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

_MEASURE = """
import json, resource, sys
sys.path.insert(0, sys.argv[3])
from tiny_io import tiny_tokenizer
from surgeon import data as D
tok = tiny_tokenizer()
D.load_ids(sys.argv[2], tok, max_tokens=32)  # imports and warm-up on a small file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = D.load_ids(sys.argv[1], tok, max_tokens=32)
windows = D.eval_windows(ids, 16, 2)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (peak - before) / 1024, "windows": windows.tolist()}))
"""


@pytest.mark.heavy
def test_two_short_windows_of_a_huge_one_line_text_take_little_memory(tmp_path):
    one_line = " ".join(synthetic_prose(40, seed=3).split("\n"))
    big = tmp_path / "big.txt"
    with open(big, "w") as f:  # 8 MB, no line break
        for _ in range(8 * 2**20 // len(one_line) + 1):
            f.write(one_line)
    small = tmp_path / "small.txt"
    small.write_text(one_line)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(big), str(small), str(ROOT / "tests")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["extra_mb"] < 64, out["extra_mb"]  # the whole file tokenized takes > 1 GB
    expected = D.eval_windows(D.load_ids(small, tiny_tokenizer()), 16, 2)
    assert torch.equal(torch.tensor(out["windows"]), expected)


@pytest.mark.parametrize("join", [D.EVAL_JOIN, None, " "], ids=["eval-join", "as-is", "space"])
def test_prefix_ids_equal_the_full_tokenization(tmp_path, join):
    text = synthetic_prose(60, seed=5).replace("\n\n", "\n\n\n", 3) + "\r\nlast line without break"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    tok = tiny_tokenizer()
    full = D.load_ids(path, tok, join=join)
    for k in (1, 17, 200, 1000, full.numel() - 1, full.numel(), full.numel() + 50):
        part = D.load_ids(path, tok, join=join, max_tokens=k)
        assert torch.equal(part, full[:k]), k
