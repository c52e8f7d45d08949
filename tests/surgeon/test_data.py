"""Text sources, tokenization cache, windows and data ids (surgeon.data)."""

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from surgeon import data as D
from surgeon.errors import SurgeonError
from tiny_io import TEXT, tiny_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------------------------------- windows

def test_calibration_windows_follow_randint_in_order():
    ids = torch.arange(1000)
    w = D.calibration_windows(ids, nsamples=6, seqlen=50, seed=3)
    rng = random.Random(3)
    starts = [rng.randint(0, 1000 - 50 - 1) for _ in range(6)]
    assert w.shape == (6, 50) and w.dtype == torch.long
    assert torch.equal(w[:, 0], torch.tensor(starts))
    assert torch.equal(w, torch.stack([ids[s:s + 50] for s in starts]))


def test_calibration_windows_seeds():
    ids = torch.arange(5000)
    a = D.calibration_windows(ids, 8, 64, seed=0)
    assert torch.equal(a, D.calibration_windows(ids, 8, 64, seed=0))
    assert not torch.equal(a, D.calibration_windows(ids, 8, 64, seed=1))


def test_calibration_windows_2d_and_errors():
    windows = torch.arange(40).view(4, 10)
    assert torch.equal(D.calibration_windows(windows, 3, 10), windows[:3])
    with pytest.raises(SurgeonError, match="only 4 calibration windows"):
        D.calibration_windows(windows, 5, 10)
    with pytest.raises(SurgeonError, match="expected seqlen 12"):
        D.calibration_windows(windows, 2, 12)
    with pytest.raises(SurgeonError, match="fewer than one calibration window"):
        D.calibration_windows(torch.arange(64), 1, 64)


def test_eval_windows():
    ids = torch.arange(100)
    w = D.eval_windows(ids, 30)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), ids[:90])
    assert D.eval_windows(ids, 30, max_windows=1).shape == (1, 30)
    with pytest.raises(SurgeonError, match="fewer than one window of 128"):
        D.eval_windows(ids, 128)
    with pytest.raises(SurgeonError, match="seqlen must be at least 2"):
        D.eval_windows(ids, 1)


def test_check_seqlen_against_model_context():
    class Cfg:
        max_position_embeddings = 256

    D.check_seqlen(256, Cfg())
    with pytest.raises(SurgeonError, match="beyond the model's context of 256"):
        D.check_seqlen(257, Cfg())


def test_data_id_covers_content_shape_and_parameters():
    a = torch.arange(12).view(3, 4)
    base = D.data_id(a, seqlen=4)
    assert base == D.data_id(a.clone(), seqlen=4)
    assert base != D.data_id(a, seqlen=5)
    assert base != D.data_id(a.view(4, 3), seqlen=4)
    b = a.clone()
    b[0, 0] = 99
    assert base != D.data_id(b, seqlen=4)


# ------------------------------------------------------------------------------------------- text sources

def test_txt_evaluation_form(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first line\r\nsecond line\r\n\r\nthird\r\n")
    # text mode (CRLF -> LF), each line with its newline, a blank line empty, joined with "\n\n"
    assert D.load_text(path) == "first line\n\n\nsecond line\n\n\n\n\nthird\n"
    assert D.load_text(path, join=" ") == "first line\n second line\n  third\n"
    assert D.load_text(path, join=None) == "first line\nsecond line\n\nthird\n"


def test_jsonl_and_parquet_columns(tmp_path):
    rows = [{"text": "alpha beta", "body": "one"}, {"text": "gamma", "body": "two"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert D.load_text(jl) == "alpha beta\n\ngamma"
    assert D.load_text(jl, column="body", join=" ") == "one two"
    with pytest.raises(SurgeonError, match=r"column 'missing' not found .*columns: text, body"):
        D.load_text(jl, column="missing")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x y", "z"]}), pqf)
    assert D.load_text(pqf, column="content") == "x y\n\nz"
    with pytest.raises(SurgeonError, match="column 'text' not found"):
        D.load_text(pqf)


def test_empty_and_missing_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    for path in (empty, blank):
        with pytest.raises(SurgeonError, match="corpus is empty"):
            D.load_text(path)
    with pytest.raises(SurgeonError, match="data file not found"):
        D.load_text(tmp_path / "nope.txt")
    with pytest.raises(SurgeonError, match="unknown builtin"):
        D.load_text("builtin:nothing")


def test_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SurgeonError, match="offline"):
        D.load_text("hf:surgeon-test/no-such-dataset:cfg", split="test")
    assert time.perf_counter() - t0 < 10


def test_hub_dataset_unreachable_fails_fast(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.perf_counter()
    with pytest.raises(SurgeonError, match="unreachable"):
        D.load_text("hf:wikitext:wikitext-2-raw-v1", split="test")
    assert time.perf_counter() - t0 < 10


@pytest.mark.heavy
def test_builtin_default_is_prose_and_deterministic():
    text = D.stdlib_docs_text()
    assert len(text) > 300_000
    assert text == D._build_stdlib_docs()  # rebuilt from the sources: same text
    assert text == D.load_text(D.BUILTIN)  # cached copy
    paragraphs = text.strip().split("\n\n")
    assert len(paragraphs) > 2000 and len(set(paragraphs)) == len(paragraphs)
    assert all(p[0].isupper() and p[-1] in ".!?" for p in paragraphs[:200])
    assert ">>>" not in text


# ------------------------------------------------------------------------------------------- tokens

def test_tokenize_once_no_special_tokens_and_cached(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))  # a fresh cache: this call's file alone
    cache = D.cache_dir("tokens")
    assert not list(cache.glob("*.npy"))
    ids = D.tokenize(tok, TEXT)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tok.backend_tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert tok.bos_token_id not in ids.tolist()
    files = list(cache.glob("*.npy"))  # the one cache file of this text, holding its ids
    assert len(files) == 1 and np.load(files[0]).tolist() == ids.tolist()

    def no_encoding(*args, **kwargs):
        raise AssertionError("tokenize encoded again instead of reading its cache")

    monkeypatch.setattr(D, "_encode", no_encoding)
    again = D.tokenize(tok, TEXT)
    assert again.dtype == torch.long and torch.equal(again, ids)
    with pytest.raises(AssertionError, match="encoded again"):  # the spy is live: new text is encoded
        D.tokenize(tok, TEXT + " more")


def test_tokenizer_hash_distinguishes(tok):
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    assert D.tokenizer_hash(tok) == D.tokenizer_hash(other)
    other.backend_tokenizer.add_tokens(["surgeon"])
    assert D.tokenizer_hash(tok) != D.tokenizer_hash(other)


def test_npy_ids_used_as_is(tmp_path, tok):
    one = tmp_path / "one.npy"
    np.save(one, np.arange(50, dtype=np.int32))
    two = tmp_path / "two.npy"
    np.save(two, np.arange(40, dtype=np.int64).reshape(4, 10))
    assert torch.equal(D.load_ids(one), torch.arange(50))
    assert torch.equal(D.load_ids(two, tok), torch.arange(40).view(4, 10))
    bad = {
        "float.npy": (np.ones(5, dtype=np.float32), "expected integer token ids"),
        "cube.npy": (np.ones((2, 2, 2), dtype=np.int32), "3 dimensions"),
        "empty.npy": (np.zeros(0, dtype=np.int32), "corpus is empty"),
        "neg.npy": (np.array([-1, 2]), "negative"),
        "big.npy": (np.array([1, 500]), "beyond the tokenizer's 128 tokens"),
    }
    for name, (arr, msg) in bad.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(SurgeonError, match=msg):
            D.load_ids(tmp_path / name, tok)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(SurgeonError, match="cannot read token ids"):
        D.load_ids(tmp_path / "junk.npy")


def test_load_ids_from_text(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    ids = D.load_ids(path, tok)
    assert torch.equal(ids, D.tokenize(tok, D.load_text(path)))
    assert not torch.equal(ids, D.load_ids(path, tok, join=None))


# ------------------------------------------------------------------------------------------- repository data

ROOT = Path(__file__).resolve().parents[2]
WIKI = ROOT / "data" / "wikitext-2-raw" / "wiki.test.raw"
DOCS = ROOT / "data" / "python-docs" / "python-docs.txt"


def test_repository_builtins_resolve_to_data_files():
    assert D.repo_data_dir() == ROOT / "data"
    assert D.builtin_path("builtin:wikitext-2-test") == WIKI
    assert D.builtin_path("builtin:python-docs") == DOCS
    assert D.builtin_path("builtin:devils-dictionary") == ROOT / "data" / "devils-dictionary" / "devils-dictionary.txt"
    assert D.builtin_path(D.BUILTIN) is None  # embedded, no file
    assert set(D.BUILTINS) == {D.BUILTIN, "builtin:wikitext-2-test", "builtin:python-docs", "builtin:devils-dictionary"}
    for ref in D.BUILTINS:
        D.check_ref(ref)
    # read exactly like the same path given as a file
    assert D.load_text("builtin:python-docs", join=None) == DOCS.read_text(encoding="utf-8")
    assert D.load_text("builtin:python-docs", join=" ") == D.load_text(DOCS, join=" ")
    text = D.load_text("builtin:wikitext-2-test")
    assert text == D.load_text(WIKI) and "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n\n")  # our evaluation form: lines joined with "\n\n"


def test_repository_builtins_absent_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "REPO_DATA_DIR", tmp_path / "no-repository" / "data")
    for ref, rel, instead in (("builtin:wikitext-2-test", "data/wikitext-2-raw/wiki.test.raw",
                               "hf:wikitext:wikitext-2-raw-v1 with split test"),
                              ("builtin:python-docs", "data/python-docs/python-docs.txt", D.BUILTIN)):
        for call in (D.check_ref, D.load_text, lambda r: D.load_ids(r, object())):
            with pytest.raises(SurgeonError) as err:
                call(ref)
            msg = str(err.value)
            assert msg.startswith(f"{ref} is the file {rel} of the llm-surgeon repository, not found at")
            assert "no repository checkout" in msg and instead in msg
    D.check_ref(D.BUILTIN)  # the embedded corpus needs no repository


def test_unknown_builtin_lists_the_known_names(tmp_path):
    for call in (D.check_ref, D.load_text):
        with pytest.raises(SurgeonError, match="unknown builtin data 'builtin:wikitext' \\(known: builtin:stdlib-docs, "
                                               "builtin:wikitext-2-test, builtin:python-docs, "
                                               "builtin:devils-dictionary\\)"):
            call("builtin:wikitext")
    with pytest.raises(SurgeonError, match="data file not found"):
        D.check_ref(tmp_path / "nope.txt")
    with pytest.raises(SurgeonError, match="is a folder"):
        D.check_ref(tmp_path)
    D.check_ref("hf:anything")  # checked when loaded
