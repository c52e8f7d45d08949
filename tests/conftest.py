import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))  # the shared helpers (tiny_models, tiny_io) import from every lane's folder
DATA = ROOT / "data"  # texts and protocol token files of the repository (data/README.md)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The lanes: the tests mirror the source tree, and each folder's tests get its lane's marker (registered in
# pyproject.toml), run in this order (the layers bottom up; the flows lane, whose Prefect harness stays up for the
# rest of the session once started, last). `make test-fast` runs the core and library lanes without the tests
# marked heavy/slow/gpu/realmodel/servers/distributed/bench; `make test` runs every lane.
LANES = {"architecture": "architecture", "surgeon_core": "core", "surgeon": "library", "surgeon_cli": "cli",
         "flows": "flows"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the lane markers select too
def pytest_collection_modifyitems(config, items):
    order = list(LANES)
    outside = []
    lane_of = {}
    for item in items:
        path = Path(str(item.path)).resolve()
        folder = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        if folder not in LANES:
            outside.append(str(path))
            continue
        item.add_marker(LANES[folder])
        lane_of[item.nodeid] = order.index(folder)
    if outside:
        raise pytest.UsageError("tests outside a lane folder (tests/" + ", tests/".join(LANES) + "): "
                                + ", ".join(sorted(set(outside))))
    items.sort(key=lambda item: lane_of[item.nodeid])  # stable: each lane keeps pytest's order


@pytest.fixture(scope="session")
def repo_data() -> Path:
    """The repository's data/ folder: data/wikitext-2-raw, data/python-docs, data/protocols/{a1,p}."""
    assert (DATA / "README.md").is_file(), f"the repository's data folder is missing: {DATA}"
    return DATA


def _tree_snapshot():
    return {p for p in ROOT.iterdir() if p.name not in {".pytest_cache", ".git"}}


@pytest.fixture(autouse=True)
def no_writes_into_working_tree():
    """Fail any test that creates files at the top of the working tree (tests must write to tmp_path)."""
    before = _tree_snapshot()
    yield
    new = {p.name for p in _tree_snapshot() - before if not p.name.startswith("__pycache__")}
    assert not new, f"test wrote into the working tree: {sorted(new)}"


def _env_folder(tmp_path_factory, var: str):
    """Point the environment variable ``var`` at a fresh temporary folder for the session, then restore it."""
    path = tmp_path_factory.mktemp(var.lower().replace("_", "-"))
    old = os.environ.get(var)
    os.environ[var] = str(path)
    yield path
    if old is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = old


@pytest.fixture(autouse=True, scope="session")
def surgeon_cache(tmp_path_factory):
    """SURGEON_CACHE (token/hash/dataset caches of `surgeon`) in a per-session temporary folder."""
    yield from _env_folder(tmp_path_factory, "SURGEON_CACHE")


@pytest.fixture(autouse=True, scope="session")
def surgeon_home(tmp_path_factory):
    """SURGEON_HOME (the pipeline's default MLflow SQLite file, Prefect home and outputs) in a temporary folder."""
    yield from _env_folder(tmp_path_factory, "SURGEON_HOME")


def smollm2_dir() -> Path | None:
    """The converted SmolLM2 folder ($SURGEON_SMOLLM2_DIR or models/smollm2-135m), or None if absent."""
    path = Path(os.environ.get("SURGEON_SMOLLM2_DIR", ROOT / "models" / "smollm2-135m"))
    return path if (path / "config.json").is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_dir()
    if path is None:
        pytest.skip("converted SmolLM2 not found (run `surgeon fetch-model smollm2-135m --output "
                    "models/smollm2-135m` or set SURGEON_SMOLLM2_DIR)")
    return path
