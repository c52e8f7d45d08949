"""Text sources, tokenization (once, cached) and token windows for calibration and evaluation.

Data references (``ref``):

- ``builtin:stdlib-docs``: embedded offline default, English prose from the docstrings of the Python standard
  library's own source files (parsed with ``ast``, never imported), so the demo needs no download.
- ``builtin:wikitext-2-test``, ``builtin:python-docs`` and ``builtin:devils-dictionary``: the texts in the
  repository's ``data/`` folder (``data/wikitext-2-raw/wiki.test.raw``, the WikiText-2 raw test split,
  ``data/python-docs/python-docs.txt``, prose of the Python 3.11 documentation, and
  ``data/devils-dictionary/devils-dictionary.txt``, Ambrose Bierce's *The Devil's Dictionary*, public domain;
  provenance, licences and sha256 in ``data/README.md``), read like the
  same path given as a file. They need the repository checkout next to the package (``data/`` beside
  ``surgeon/``); an installed wheel alone has no ``data/`` and gets one error naming the alternatives.
- ``hf:NAME[:CONFIG]``: a Hub dataset through ``datasets.load_dataset`` (``split`` and ``column`` are separate
  options), e.g. ``hf:wikitext:wikitext-2-raw-v1`` with split ``test``. Offline, it fails fast.
- ``PATH.txt`` (any extension not listed below is read as text), ``PATH.jsonl`` / ``PATH.json``,
  ``PATH.parquet``: local files through ``datasets`` (``load_dataset("text"|"json"|"parquet")``).
- ``PATH.npy``: token ids used as they are (1-D: one long sequence; 2-D: ready-made windows), e.g. the exact
  token files of the benchmark protocols in ``data/protocols/`` (``protocol_arrays`` rebuilds them from the texts).

Joining. Records (lines of a text file, rows of a dataset) are joined with ``join`` (default ``"\\n\\n"``, as
SparseGPT/Wanda join WikiText rows). A text file is read in text mode (CRLF becomes ``"\\n"``) line by line, each
line with its trailing newline and a blank line as an empty string, which is exactly what the Hub's WikiText rows
look like: this is "our evaluation form" of ``wiki.test.raw``. ``join=None`` reads a text file as is (the
calibration form of protocol P).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from surgeon_core.evaluate import windows_from_ids

from .errors import SurgeonError
from .integrity import read_record, write_record
from .utils import atomic_write, cache_dir, sha256_bytes

__all__ = [
    "BUILTIN",
    "BUILTINS",
    "REPO_BUILTINS",
    "PROTOCOLS",
    "EVAL_JOIN",
    "repo_data_dir",
    "builtin_path",
    "check_ref",
    "protocol_arrays",
    "load_text",
    "load_ids",
    "tokenize",
    "tokenizer_hash",
    "read_cached_ids",
    "write_cached_ids",
    "calibration_windows",
    "eval_windows",
    "data_id",
    "check_seqlen",
    "stdlib_docs_text",
    "parse_join",
]

BUILTIN = "builtin:stdlib-docs"
EVAL_JOIN = "\n\n"
_JSON_SUFFIXES = {".json", ".jsonl"}

# Texts of the repository's data/ folder: builtin name -> (path under data/, what to use without the repository).
REPO_BUILTINS: dict[str, tuple[str, str]] = {
    "builtin:wikitext-2-test": (
        "wikitext-2-raw/wiki.test.raw",
        "hf:wikitext:wikitext-2-raw-v1 with split test (the Hub copy keeps the split's empty rows, so its tokens "
        "differ slightly from the repository file's)"),
    "builtin:python-docs": (
        "python-docs/python-docs.txt",
        f"{BUILTIN} (embedded, no download) or a local copy of python-docs.txt"),
    "builtin:devils-dictionary": (
        "devils-dictionary/devils-dictionary.txt",
        "a local copy of Ambrose Bierce's The Devil's Dictionary (public domain; Debian package dict-devil)"),
}
BUILTINS = (BUILTIN, *REPO_BUILTINS)
# The repository's data/ folder, found from the package location (absent in an installed wheel).
REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def parse_join(value: str | None) -> str | None:
    """CLI form of ``join``: ``raw`` -> None (file as is), ``space`` -> ' ', else backslash escapes decoded."""
    if value is None or value == "raw":
        return None
    if value == "space":
        return " "
    return value.encode("utf-8").decode("unicode_escape")


# --------------------------------------------------------------------------------------------------- builtin

_STDLIB_SKIP = {
    "antigravity", "this",  # side effects on import (we never import, but their "docs" are jokes)
    "idlelib", "lib2to3", "turtledemo", "test", "tkinter", "ensurepip", "pydoc_data", "distutils",
}
_SKIP_DIRS = {"test", "tests", "idle_test"}
_BUILTIN_VERSION = 1  # bump when the extraction rules change


def _prose_paragraphs(doc: str):
    for para in doc.split("\n\n"):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "$ ", "%")) for ln in lines):
            continue
        text = " ".join(" ".join(lines).split())
        words = text.split()
        if len(words) < 6 or not text[0].isupper() or text[-1] not in ".!?":
            continue
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if letters < 0.85 * len(text):
            continue
        yield text


def _stdlib_sources() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _STDLIB_SKIP):
        single, package = root / f"{name}.py", root / name
        if single.is_file():
            out.append((name, single))
        elif (package / "__init__.py").is_file():
            files = sorted(p for p in package.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(package).parts)))
            out.extend((name, p) for p in files)
    return out


def _build_stdlib_docs() -> str:
    """Docstrings (module, then classes/functions in source order) of the stdlib's source files."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    for _, path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        nodes = [tree]
        while nodes:  # depth-first, in source order
            node = nodes.pop(0)
            doc = ast.get_docstring(node, clean=True) if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if doc:
                for para in _prose_paragraphs(doc):
                    if para not in seen:
                        seen.add(para)
                        paragraphs.append(para)
            children = [c for c in getattr(node, "body", [])
                        if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                        and not c.name.startswith("_")]
            nodes[0:0] = children
    return "\n\n".join(paragraphs) + "\n"


def stdlib_docs_text() -> str:
    """The embedded offline corpus (``builtin:stdlib-docs``), cached per Python version."""
    key = f"stdlib-docs-v{_BUILTIN_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = cache_dir("text") / f"{key}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = _build_stdlib_docs()
    if len(text) < 10_000:
        raise SurgeonError(f"{BUILTIN}: the Python standard library sources were not found under "
                           f"{sysconfig.get_paths()['stdlib']}")
    try:
        atomic_write(path, text)
    except OSError:
        pass
    return text


# --------------------------------------------------------------------------------------------------- repository data

def repo_data_dir() -> Path:
    """The repository's ``data/`` folder (``REPO_DATA_DIR``), whether or not it exists."""
    return REPO_DATA_DIR


def builtin_path(ref: str) -> Path | None:
    """The file behind a builtin name of the repository's data (None for ``builtin:stdlib-docs``).

    One clear ``SurgeonError`` for an unknown name, or when the file is absent (an installed package without the
    repository checkout), naming what to use instead.
    """
    if ref == BUILTIN:
        return None
    if ref not in REPO_BUILTINS:
        raise SurgeonError(f"unknown builtin data '{ref}' (known: {', '.join(BUILTINS)})")
    rel, instead = REPO_BUILTINS[ref]
    path = repo_data_dir() / rel
    if not path.is_file():
        raise SurgeonError(f"{ref} is the file data/{rel} of the llm-surgeon repository, not found at {path} "
                           f"(this installation has no repository checkout next to the package); use {instead}")
    return path


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SurgeonError(f"data file not found: {path} (or use {BUILTIN} or hf:NAME[:CONFIG])")
    if path.is_dir():
        raise SurgeonError(f"data path is a folder, expected a file: {path}")
    if not path.is_file():  # a device (/dev/zero) or a pipe never ends or cannot be read twice
        raise SurgeonError(f"data path {path} is not a regular file")


def check_ref(ref: str | os.PathLike) -> None:
    """Cheap early check of a data reference (before a model is loaded): a known builtin whose file is present,
    ``hf:...`` (checked when loaded), or an existing file."""
    ref_s = str(ref)
    if ref_s.startswith("builtin:"):
        builtin_path(ref_s)
    elif not ref_s.startswith("hf:"):
        _check_file(Path(ref_s).expanduser())


# --------------------------------------------------------------------------------------------------- text

def _join_rows(rows, join: str | None) -> str:
    return (EVAL_JOIN if join is None else join).join("" if r is None else str(r) for r in rows)


def _local_dataset(kind: str, path: Path, **kwargs):
    from datasets import load_dataset

    try:
        return load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache_dir("datasets")),
                            **kwargs)
    except Exception as exc:
        raise SurgeonError(f"cannot read {path} as {kind}: {_first_line(exc)}") from exc


def _column(ds, column: str, where: str) -> list:
    names = list(ds.column_names)
    if column not in names:
        raise SurgeonError(f"column '{column}' not found in {where} (columns: {', '.join(names) or 'none'})")
    dtype = getattr(ds.features.get(column), "dtype", None)
    if dtype not in ("string", "large_string"):  # numbers or lists would be turned into text silently
        raise SurgeonError(f"column '{column}' of {where} holds {dtype or 'non-string'} values, not text; "
                           "choose a text column")
    return ds[column]


def _hub_text(ref: str, split: str | None, column: str, join: str | None) -> str:
    from .models import hub_reachable

    spec = ref[3:]
    name, _, config = spec.partition(":")
    if not name:
        raise SurgeonError(f"bad dataset reference '{ref}': expected hf:NAME[:CONFIG]")
    config = config or None
    split = split or "train"
    label = f"Hub dataset '{name}'" + (f" (config '{config}')" if config else "")
    offline = any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"}
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if not offline and not hub_reachable():
        raise SurgeonError(f"{label}: the Hugging Face Hub is unreachable; use a local file, `{BUILTIN}`, or set "
                           "HF_DATASETS_OFFLINE=1 to use the local datasets cache")
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except Exception as exc:
        hint = " (offline: only datasets in the local cache can be used)" if offline else ""
        raise SurgeonError(f"cannot load {label} split '{split}'{hint}: {_first_line(exc)}") from exc
    return _join_rows(_column(ds, column, label), join)


def load_text(ref: str | os.PathLike, *, split: str | None = None, column: str = "text",
              join: str | None = EVAL_JOIN) -> str:
    """The text of a data reference, records joined with ``join`` (see the module docstring).

    ``join=None``: a text file is read as is; rows of datasets are joined with ``"\\n\\n"``.
    """
    ref_s = str(ref)
    if ref_s.startswith("hf:"):
        text = _hub_text(ref_s, split, column, join)
    elif ref_s == BUILTIN:
        text = stdlib_docs_text()
    else:
        path = builtin_path(ref_s) if ref_s.startswith("builtin:") else Path(ref_s).expanduser()
        _check_file(path)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            raise SurgeonError(f"{path} holds token ids, not text (use load_ids)")
        if suffix in _JSON_SUFFIXES:
            text = _join_rows(_column(_local_dataset("json", path), column, str(path)), join)
        elif suffix == ".parquet":
            text = _join_rows(_column(_local_dataset("parquet", path), column, str(path)), join)
        elif join is None:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise SurgeonError(f"cannot read text file {path}: {_first_line(exc)}") from exc
        else:
            if path.stat().st_size == 0:
                raise SurgeonError(f"corpus is empty: {path}")
            rows = _local_dataset("text", path, keep_linebreaks=True)["text"]
            # a blank line is an empty record, like the empty rows of the Hub's WikiText
            text = join.join("" if r in ("\n", "\r\n") else r for r in rows)
    if not text.strip():
        raise SurgeonError(f"corpus is empty: {ref_s}")
    return text


# --------------------------------------------------------------------------------------------------- tokens

def tokenizer_hash(tokenizer) -> str:
    """A content hash of a tokenizer (its serialized fast-tokenizer state, or its vocabulary)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _encode(tokenizer, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize(tokenizer, text: str, *, use_cache: bool = True) -> torch.Tensor:
    """Token ids (1-D LongTensor) of ``text`` in one pass, no special tokens (no BOS/EOS).

    Cached on disk (``$SURGEON_CACHE/tokens``) by tokenizer hash + text hash, each ``.npy`` with a signed record
    of its sha256 (:mod:`surgeon.integrity`): an entry written by anyone without the key is tokenized again.
    """
    if not text:
        raise SurgeonError("corpus is empty: nothing to tokenize")
    key = sha256_bytes(tokenizer_hash(tokenizer) + ":" + sha256_bytes(text))[:40]
    path = cache_dir("tokens") / f"{key}.npy" if use_cache else None
    if path is not None:
        cached = read_cached_ids(path, key)
        if cached is not None:
            return cached
    arr = np.asarray(_encode(tokenizer, text), dtype=np.int64)
    if path is not None:
        try:
            write_cached_ids(path, key, arr)
        except OSError:
            pass
    return torch.from_numpy(arr)


def write_cached_ids(path: Path, key: str, ids: np.ndarray, **record) -> None:
    """Token ids as a cache ``.npy`` (int32 when they fit) with a signed record of ``key`` vouching for its bytes
    (and holding ``record``), both written atomically; :func:`read_cached_ids` reads it back."""
    buf = io.BytesIO()
    np.save(buf, ids.astype(np.int32) if ids.size and ids.max() < 2**31 else ids)
    atomic_write(path, buf.getvalue())
    write_record(path.with_suffix(".json"), key, {"sha256": sha256_bytes(buf.getvalue()), **record})


def read_cached_ids(path: Path, key: str) -> torch.Tensor | None:
    """The ids (int64) of a cache entry whose signed record of ``key`` vouches for its bytes; else None."""
    value, _ = read_record(path.with_suffix(".json"), key,
                           check=lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str))
    try:
        data = path.read_bytes() if value is not None else None
        if data is None or sha256_bytes(data) != value["sha256"]:
            return None
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.int64))
    except (OSError, ValueError):
        return None


def _load_npy(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SurgeonError(f"cannot read token ids from {path}: {_first_line(exc)}") from exc
    if not np.issubdtype(arr.dtype, np.integer):
        raise SurgeonError(f"{path} holds {arr.dtype} values, expected integer token ids")
    if arr.ndim not in (1, 2):
        raise SurgeonError(f"{path} has {arr.ndim} dimensions, expected 1 (a sequence) or 2 (windows)")
    if arr.size == 0:
        raise SurgeonError(f"corpus is empty: {path}")
    if arr.min() < 0:
        raise SurgeonError(f"{path} holds negative token ids")
    if int(arr.max()) > np.iinfo(np.int64).max:  # an unsigned id that would wrap around in int64
        raise SurgeonError(f"{path} holds token id {int(arr.max())}, beyond any vocabulary")
    return torch.from_numpy(arr.astype(np.int64))


_PIECE = 1 << 20  # characters read at a time: a file of one huge line is never read whole for a prefix
_MARGIN_TOKENS = 64  # a prefix's last tokens may differ from the full text's (a word cut in two), earlier ones not


def _plain_text_file(ref_s: str) -> Path | None:
    """The file of a reference that :func:`load_text` reads as plain text (not a dataset, JSON or Parquet)."""
    if ref_s.startswith("hf:") or ref_s == BUILTIN:
        return None
    path = builtin_path(ref_s) if ref_s.startswith("builtin:") else Path(ref_s).expanduser()
    _check_file(path)
    return None if path.suffix.lower() in (*_JSON_SUFFIXES, ".parquet", ".npy") else path


def _text_prefix(path: Path, join: str | None, chars: int) -> tuple[str, bool]:
    """At least the first ``chars`` characters of ``load_text(path, join=join)`` (or all of it), read in pieces;
    and whether that is the whole text. Lines are records exactly as the ``datasets`` text loader splits them
    (text mode, split at ``"\n"``, line breaks kept, a blank line an empty record)."""
    parts, n, first, row_start = [], 0, True, True
    try:
        with open(path, encoding="utf-8") as f:
            while n < chars:
                size = min(_PIECE, chars - n)
                piece = f.read(size) if join is None else f.readline(size)
                if not piece:
                    return "".join(parts), True
                ends_row = piece.endswith("\n")
                if join is not None and row_start:
                    if not first:
                        parts.append(join)
                        n += len(join)
                    first = False
                    if piece == "\n":
                        piece = ""
                row_start = ends_row
                parts.append(piece)
                n += len(piece)
    except (OSError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"cannot read text file {path}: {_first_line(exc)}") from exc
    return "".join(parts), False


def _prefix_ids(path: Path, tokenizer, join: str | None, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` ids of the file's text, tokenizing a prefix that doubles until it holds them with
    a margin: memory and time follow the tokens asked for, not the file."""
    chars = 8 * (max_tokens + _MARGIN_TOKENS)
    while True:
        text, whole = _text_prefix(path, join, chars)
        if whole:
            if not text.strip():
                raise SurgeonError(f"corpus is empty: {path}")
            return tokenize(tokenizer, text, use_cache=False)[:max_tokens]
        ids = _encode(tokenizer, text)
        if len(ids) >= max_tokens + _MARGIN_TOKENS:
            return torch.tensor(ids[:max_tokens], dtype=torch.int64)
        chars *= 2


def load_ids(ref: str | os.PathLike, tokenizer=None, *, split: str | None = None, column: str = "text",
             join: str | None = EVAL_JOIN, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids for a data reference: a ``.npy`` file as is (1-D or 2-D), else ``tokenize(load_text(...))``.

    ``max_tokens``: only the first ``max_tokens`` ids are needed (evaluation windows); a plain text file is then
    read and tokenized only as far as they reach, so a huge file costs what the windows cost. Ids are checked
    against the tokenizer's vocabulary size when a tokenizer is given.
    """
    ref_s = str(ref)
    if ref_s.lower().endswith(".npy") and not ref_s.startswith(("hf:", "builtin:")):
        path = Path(ref_s).expanduser()
        if not path.exists():
            raise SurgeonError(f"data file not found: {path}")
        ids = _load_npy(path)
    else:
        if tokenizer is None:
            raise SurgeonError(f"a tokenizer is needed to tokenize {ref_s}")
        text_file = _plain_text_file(ref_s) if max_tokens else None
        if text_file is not None:
            ids = _prefix_ids(text_file, tokenizer, join, max_tokens)
        else:
            ids = tokenize(tokenizer, load_text(ref_s, split=split, column=column, join=join))
    if ids.numel() == 0:
        raise SurgeonError(f"corpus is empty: {ref_s}")
    if tokenizer is not None:
        vocab = len(tokenizer)
        if int(ids.max()) >= vocab:
            raise SurgeonError(f"{ref_s} holds token id {int(ids.max())}, beyond the tokenizer's {vocab} tokens")
    return ids


# --------------------------------------------------------------------------------------------------- windows

def check_seqlen(seqlen: int, config=None) -> None:
    """seqlen must be >= 2 and within the model's context (``max_position_embeddings``)."""
    if seqlen < 2:
        raise SurgeonError(f"seqlen must be at least 2, got {seqlen}")
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    if limit is not None and seqlen > int(limit):
        raise SurgeonError(f"seqlen {seqlen} is beyond the model's context of {limit} tokens "
                           "(max_position_embeddings)")


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows (n, seqlen) of a 1-D id sequence.

    Starts are drawn in order with ``random.Random(seed).randint(0, N - seqlen - 1)`` (the SparseGPT/Wanda
    sampler). Reproduces ``data/protocols/p/calibration_windows.npy`` (128 x 2048, file read as is, N = 738,278)
    and ``data/protocols/a1/calibration_windows.npy`` (32 x 512, lines joined with a space, N = 723,602) exactly,
    seed 0 (``protocol_arrays``; checked by ``tests/surgeon/test_protocol_data.py``). For those N,
    ``random.sample(range(N - seqlen), k)`` and ``randint(0, N - seqlen)`` draw the very same starts (all three
    consume the same ``getrandbits`` values and no draw was rejected), so either reference sampler matches.
    A 2-D input is taken as ready-made windows: its first ``nsamples`` rows are returned.
    """
    if nsamples < 1:
        raise SurgeonError(f"nsamples must be at least 1, got {nsamples}")
    check_seqlen(seqlen)
    if ids.dim() == 2:
        if ids.shape[1] != seqlen:
            raise SurgeonError(f"calibration windows have {ids.shape[1]} tokens, expected seqlen {seqlen}")
        if ids.shape[0] < nsamples:
            raise SurgeonError(f"only {ids.shape[0]} calibration windows available, {nsamples} requested")
        return ids[:nsamples].long()
    n = ids.numel()
    if n < seqlen + 1:
        raise SurgeonError(f"corpus has {n} tokens, fewer than one calibration window of {seqlen} (+1)")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).long()


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seqlen) windows, remainder dropped (2-D input: windows as is)."""
    check_seqlen(seqlen)
    if max_windows is not None and max_windows < 1:
        raise SurgeonError(f"max_windows must be at least 1, got {max_windows}")
    if ids.dim() == 1 and ids.numel() < seqlen:
        raise SurgeonError(f"corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    try:
        return windows_from_ids(ids, seqlen, max_windows)
    except ValueError as exc:
        raise SurgeonError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------- protocols

# The exact token files of the benchmark protocols (data/protocols/NAME/FILE), each made from a text of data/ with
# one tokenizer pass (SmolLM2 tokenizer, no special tokens) and then cut into windows:
#   join: how the text file's lines are joined (None: the file read as is; see the module docstring);
#   windows: "calibration" (calibration_windows with nsamples/seqlen/seed), "eval" (eval_windows with
#   seqlen/max_windows) or None (the whole 1-D id sequence).
PROTOCOLS: dict[str, dict[str, dict]] = {
    "a1": {
        "calibration_windows.npy": dict(text="builtin:python-docs", join=" ", windows="calibration",
                                        nsamples=32, seqlen=512, seed=0),
        "eval_windows.npy": dict(text="builtin:wikitext-2-test", join=EVAL_JOIN, windows="eval",
                                 seqlen=512, max_windows=128),
    },
    "p": {
        "calibration_windows.npy": dict(text="builtin:python-docs", join=None, windows="calibration",
                                        nsamples=128, seqlen=2048, seed=0),
        "eval_ids.npy": dict(text="builtin:wikitext-2-test", join=EVAL_JOIN, windows=None),
    },
}


def protocol_arrays(name: str, tokenizer) -> dict[str, np.ndarray]:
    """The token files of benchmark protocol ``name`` (``a1`` or ``p``), rebuilt from the repository's texts.

    File name -> int32 array; ``np.save`` of each writes the very bytes of ``data/protocols/NAME/FILE`` when the
    tokenizer is SmolLM2's (see ``data/protocols/NAME/README.md``).
    """
    if name not in PROTOCOLS:
        raise SurgeonError(f"unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
    out: dict[str, np.ndarray] = {}
    for fname, spec in PROTOCOLS[name].items():
        ids = load_ids(spec["text"], tokenizer, join=spec["join"])
        if spec["windows"] == "calibration":
            ids = calibration_windows(ids, spec["nsamples"], spec["seqlen"], seed=spec["seed"])
        elif spec["windows"] == "eval":
            ids = eval_windows(ids, spec["seqlen"], spec["max_windows"])
        out[fname] = ids.numpy().astype(np.int32)
    return out


def data_id(tokens: torch.Tensor, **params) -> str:
    """Content hash of a token tensor (values and shape) plus the parameters that produced it."""
    arr = np.ascontiguousarray(tokens.detach().cpu().numpy().astype(np.int64))
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(arr.shape), **params}, sort_keys=True, default=str).encode())
    h.update(arr.tobytes())
    return h.hexdigest()
