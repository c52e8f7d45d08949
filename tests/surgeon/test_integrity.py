"""surgeon.integrity: the per-home MAC key, signed cache records, folder digests and lock files."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon import integrity
from surgeon.errors import SurgeonError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SURGEON_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_key_file_is_private_stable_and_refused_when_shared_or_linked(home, tmp_path):
    key = integrity.secret_key()
    f = home / integrity.KEY_FILE
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and len(key) == 64
    assert integrity.secret_key() == key
    f.chmod(0o644)
    with pytest.raises(SurgeonError, match="mode 0600"):
        integrity.secret_key()
    f.unlink()
    (tmp_path / "elsewhere").write_text("x" * 64)
    f.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SurgeonError, match="regular file"):
        integrity.secret_key()


def test_two_processes_creating_the_key_at_once_agree(home):
    code = "from surgeon.integrity import secret_key; print(secret_key().decode())"
    env = {**os.environ, "SURGEON_HOME": str(home), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and len(keys.pop()) == 64


def test_record_round_trip_and_every_kind_of_tampering(home, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"weights")
    path = tmp_path / "r.json"
    value = {"report": {"ppl": math.inf, "sizes": [0.5, 0.25]}}
    integrity.write_record(path, "k1", value, integrity.folder_digest(folder))
    got, problem = integrity.read_record(path, "k1", folder=folder)
    assert problem is None and got == value
    assert integrity.read_record(tmp_path / "none.json", "k1") == (None, None)
    assert integrity.read_record(path, "k2")[1] == "belongs to another entry"
    assert "unexpected shape" in integrity.read_record(path, "k1", check=lambda v: "other" in v)[1]
    record = json.loads(path.read_text())
    for change, problem in [(lambda r: r["value"]["report"].update(ppl=1.0), "wrong MAC"),
                            (lambda r: r.update(mac="0" * 64), "wrong MAC"),
                            (lambda r: r.update(extra=1), "not a surgeon cache record")]:
        forged = json.loads(json.dumps(record))
        change(forged)
        path.write_text(json.dumps(forged))
        assert problem in integrity.read_record(path, "k1")[1]
    path.write_text("\x80 not json")
    assert integrity.read_record(path, "k1")[1] == "is not a JSON record"
    integrity.write_record(path, "k1", value, integrity.folder_digest(folder))
    (folder / "w.bin").write_bytes(b"weighs")
    assert "changed since: w.bin" in integrity.read_record(path, "k1", folder=folder)[1]
    (home / integrity.KEY_FILE).unlink()  # another home's key: its records are not trusted
    assert "wrong MAC" in integrity.read_record(path, "k1")[1]


def test_lock_file_refuses_a_symlink_and_excludes_a_second_holder(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "l.lock").symlink_to(victim)
    with pytest.raises(SurgeonError, match="symbolic link"):
        with integrity.file_lock(tmp_path / "l.lock"):
            pass
    assert victim.read_text() == "keep"
    waited = []
    with integrity.file_lock(tmp_path / "m.lock"):
        fd = integrity.open_lock_file(tmp_path / "m.lock")
        try:
            import fcntl

            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with integrity.file_lock(tmp_path / "m.lock", on_wait=lambda: waited.append(1)):
        pass
    assert not waited
