"""Model folders are data: a crafted folder whose config or tokenizer config points (``auto_map``) at a Python file
never runs it, not even with ``y`` on stdin; every loading call in the sources passes ``trust_remote_code=False``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.errors import SurgeonError
from tiny_io import TEXT, save_tiny

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["surgeon", "surgeon_cli", "surgeon_core", "tasks", "flows", "benchmarks", "deployments"]
LOADERS = {"from_pretrained", "from_config"}


def crafted(root: Path, good: Path, marker: Path, *, model_type: str | None, tokenizer: bool) -> Path:
    """A copy of ``good`` whose config (``model_type`` changed when given) and/or tokenizer config map the Auto
    classes to ``evil.py``, which creates ``marker`` when imported."""
    folder = root / f"crafted-{model_type or 'llama'}-{'tok' if tokenizer else 'cfg'}"
    folder.mkdir()
    for f in good.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    if tokenizer:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]},
                  tokenizer_class="EvilTokenizer")
        (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
                   architectures=["EvilModel"])
        if model_type:
            cfg["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("trust") / "tiny")


CASES = {"unknown architecture": dict(model_type="evilarch", tokenizer=False),
         "known architecture": dict(model_type=None, tokenizer=False),
         "tokenizer": dict(model_type=None, tokenizer=True)}


@pytest.mark.heavy
@pytest.mark.parametrize("case", list(CASES))
def test_crafted_model_folder_runs_nothing_even_with_yes_on_stdin(case, good, tmp_path):
    marker = tmp_path / "executed"
    folder = crafted(tmp_path, good, marker, **CASES[case])
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for args in (["eval", "--model", folder, "--data", text, "--seqlen", 16, "--max-windows", 2],
                 ["prune", "--model", folder, "--calibration", text, "--nsamples", 2, "--seqlen", 16,
                  "--output", tmp_path / "out", "--no-register", "threads=1"]):
        proc = subprocess.run([sys.executable, "-m", "surgeon_cli", *map(str, args)], input="y\n" * 20,
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert not marker.exists(), (case, args[0], proc.stderr[-2000:])
        if case != "known architecture":  # a known model_type loads through the library's own classes
            assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    # in process, through the library's loaders
    from surgeon.inputs import _model_config, _tokenizer
    from surgeon.models import load_model

    for load in (lambda: load_model(folder), lambda: _tokenizer(str(folder)), lambda: _model_config(str(folder))):
        try:
            load()
        except (SurgeonError, ValueError, OSError):
            pass
        assert not marker.exists(), case


def _loader_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS:
            yield node


def test_every_loading_call_passes_trust_remote_code_false():
    """Every ``from_pretrained`` / ``from_config`` call in the product's sources says ``trust_remote_code=False``
    (an Auto class given no value may ask on stdin, and a piped ``y`` runs the folder's code)."""
    seen, missing = 0, []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for call in _loader_calls(path):
                seen += 1
                kw = {k.arg: k.value for k in call.keywords}
                value = kw.get("trust_remote_code")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    missing.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert seen >= 10
    assert not missing, "calls without trust_remote_code=False: " + ", ".join(missing)


def test_materialized_folder_loads_through_the_registered_classes_not_its_modelling_file(tmp_path):
    """The product's own materialized format loads (``trust_remote_code=False``) through the classes
    ``surgeon.materialized_export`` registers: the modelling file shipped in the folder is never imported."""
    import torch

    from surgeon.materialized_export import materialize_dir
    from surgeon.models import load_model
    from tiny_io import tiny_tokenizer
    from tiny_models import coupled_pruned, tiny_windows

    model = coupled_pruned("llama")
    x = tiny_windows(2, 16, seed=1)
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    materialize_dir(tmp_path / "src", tmp_path / "out")
    marker = tmp_path / "executed"
    shipped = [p for p in (tmp_path / "out").glob("*.py")]
    assert shipped, "the materialized folder ships its modelling file for users without surgeon"
    for p in shipped:
        p.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + p.read_text())
    loaded, _, info = load_model(tmp_path / "out")
    with torch.no_grad():
        assert (loaded(x).logits - ref).abs().max() <= 1e-4
    assert not marker.exists() and info.source == "dir"
