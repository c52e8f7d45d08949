"""The repository's data/ folder: every file matches the sha256 of its README, the index lists every file, and the
protocol token files come out of the texts, byte for byte, by the documented procedure (realmodel: SmolLM2 tokenizer).
"""

import hashlib
import io
import re

import numpy as np
import pytest
import torch

from surgeon import data as D
from surgeon.errors import SurgeonError

pytestmark = pytest.mark.unit

SHA_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.M)


def _data_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_data_file_matches_the_sha256_of_its_readme(repo_data):
    recorded = {}
    for readme in repo_data.rglob("README.md"):
        for digest, name in SHA_LINE.findall(readme.read_text(encoding="utf-8")):
            path = readme.parent / name
            assert path not in recorded, f"{path} has two sha256 lines"
            recorded[path] = digest
    files = _data_files(repo_data)
    assert len(files) == 8
    assert set(recorded) == set(files), "a file without a sha256 line in its README, or a line without a file"
    bad = [str(p.relative_to(repo_data)) for p in files if _sha256(p) != recorded[p]]
    assert not bad, f"data files differ from the sha256 in their README (corrupted checkout?): {bad}"


def test_index_lists_every_file_with_its_size(repo_data):
    index = (repo_data / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \[`([^`]+)`\]\([^)]+\) \|.*\| ([\d,]+) B \|", index, re.M))
    files = {str(p.relative_to(repo_data)): p for p in _data_files(repo_data)}
    assert set(rows) == set(files)
    for rel, size in rows.items():
        assert int(size.replace(",", "")) == files[rel].stat().st_size, rel


def test_protocol_table_matches_the_token_files(repo_data):
    for name, spec in D.PROTOCOLS.items():
        folder = repo_data / "protocols" / name
        assert {p.name for p in folder.glob("*.npy")} == set(spec)
        for fname, s in spec.items():
            arr = np.load(folder / fname, mmap_mode="r")
            assert arr.dtype == np.int32
            D.check_ref(s["text"])
            if s["windows"] == "calibration":
                assert arr.shape == (s["nsamples"], s["seqlen"])
            elif s["windows"] == "eval":
                assert arr.shape == (s["max_windows"], s["seqlen"])
            else:
                assert arr.ndim == 1
    with pytest.raises(SurgeonError, match="unknown protocol 'b2'"):
        D.protocol_arrays("b2", None)


# ------------------------------------------------------------------------------------------- SmolLM2 tokens

@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _ids(path):
    return torch.from_numpy(np.load(path).astype(np.int64))


@pytest.mark.realmodel
def test_protocol_a1_from_the_texts(smol_tok, repo_data):
    folder = repo_data / "protocols" / "a1"
    docs = D.load_ids("builtin:python-docs", smol_tok, join=" ")  # lines joined with a space
    assert docs.numel() == 723_602
    assert torch.equal(D.calibration_windows(docs, 32, 512, seed=0), _ids(folder / "calibration_windows.npy"))
    wiki = D.load_ids("builtin:wikitext-2-test", smol_tok)  # our evaluation form: lines joined with "\n\n"
    assert wiki.numel() == 304_838
    assert torch.equal(D.eval_windows(wiki, 512, 128), _ids(folder / "eval_windows.npy"))
    for fname, arr in D.protocol_arrays("a1", smol_tok).items():  # the product's rebuild: the same bytes
        assert _npy_bytes(arr) == (folder / fname).read_bytes(), fname


@pytest.mark.realmodel
def test_protocol_p_from_the_texts(smol_tok, repo_data):
    folder = repo_data / "protocols" / "p"
    docs = D.load_ids("builtin:python-docs", smol_tok, join=None)  # the file read as is
    assert docs.numel() == 738_278
    assert torch.equal(D.calibration_windows(docs, 128, 2048, seed=0), _ids(folder / "calibration_windows.npy"))
    wiki = D.load_ids("builtin:wikitext-2-test", smol_tok)
    assert torch.equal(wiki, _ids(folder / "eval_ids.npy"))
    assert D.eval_windows(wiki, 2048).shape == (148, 2048)
    assert D.load_ids(repo_data / "wikitext-2-raw" / "wiki.test.raw", smol_tok, join=None).numel() == 301_948
    for fname, arr in D.protocol_arrays("p", smol_tok).items():
        assert _npy_bytes(arr) == (folder / fname).read_bytes(), fname
