"""surgeon_core stays pure torch: importing every module pulls in no framework and does no I/O at import."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import surgeon_core

pytestmark = pytest.mark.unit


def test_surgeon_core_imports_no_frameworks():
    modules = sorted(m.name for m in pkgutil.iter_modules(surgeon_core.__path__))
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module('surgeon_core.' + m)\n"
            "bad = {'transformers', 'datasets', 'prefect', 'mlflow', 'lm_eval'} & set(sys.modules)\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(surgeon_core.__file__).parents[1])


def test_surgeon_core_has_no_print_or_file_io():
    root = Path(surgeon_core.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        for needle in ("print(", "open(", "torch.save(", "torch.load("):
            assert needle not in text, f"{path.name} uses {needle}"
