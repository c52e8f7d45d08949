"""The pipeline cache is data: a crafted or corrupt cache entry never runs code and is recomputed with a warning.

Prefect result files name their own serializer (pickle, or JSON whose ``__class__`` names any callable); whoever
can write the cache folder (a shared cache for sweeps across machines) must not run code on the next identical run.
Every cached result file is replaced by such a payload, whose effect would be a marker file; the rerun must leave no
marker, warn, recompute the shots and give the same weights."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.flows


class _Touch:
    """Unpickling this object runs ``touch PATH``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def pickle_payload(marker: Path) -> bytes:
    """A Prefect result record whose serializer is pickle and whose result runs ``touch marker`` when loaded."""
    return json.dumps({"metadata": {"storage_key": None, "expiration": None,
                                    "serializer": {"type": "pickle", "picklelib": "pickle"},
                                    "prefect_version": "3.9.1", "storage_block_id": None},
                       "result": base64.b64encode(pickle.dumps(_Touch(marker))).decode()}).encode()


def json_class_payload(marker: Path) -> bytes:
    """A Prefect result record with the JSON serializer whose ``__class__`` names ``subprocess.getoutput``."""
    result = json.dumps({"__class__": "subprocess.getoutput", "data": f"touch {marker}"})
    return json.dumps({"metadata": {"storage_key": None, "expiration": None,
                                    "serializer": {"type": "json", "jsonlib": "json",
                                                   "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                                                   "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                                                   "dumps_kwargs": {}, "loads_kwargs": {}},
                                    "prefect_version": "3.9.1", "storage_block_id": None},
                       "result": result}).encode()


def cache_entries(cache: Path) -> list[Path]:
    """Every file the pipeline keeps as a cached task result (Prefect's result files or the product's records)."""
    return [p for d in ("results", "records") for p in sorted((cache / "pipeline" / d).glob("**/*")) if p.is_file()]


@pytest.fixture
def shot_calls(monkeypatch):
    from tasks import steps

    real, calls = steps.runner.prune_step_dir, []

    def spy(cfg, source_dir, calib_path, step, ckpt_dir, progress=None, log=None):
        calls.append(step.shot)
        return real(cfg, source_dir, calib_path, step, ckpt_dir, progress=progress, log=log)

    monkeypatch.setattr(steps.runner, "prune_step_dir", spy)
    return calls


@pytest.mark.parametrize("payload", [pickle_payload, json_class_payload], ids=["pickle", "json-class"])
def test_crafted_cache_entry_runs_nothing_and_is_recomputed(payload, tiny_recipe, shot_calls, tmp_path, monkeypatch,
                                                            caplog):
    from flows.prune import prune_flow

    cache = tmp_path / "cache"
    monkeypatch.setenv("SURGEON_CACHE", str(cache))
    recipe = {**tiny_recipe, "register_model": False, "seed": 11}
    first = prune_flow({**recipe, "output": str(tmp_path / "first")})
    assert shot_calls == [1, 2] and first["cached_shots"] == []
    entries = cache_entries(cache)
    assert entries
    marker = tmp_path / "executed"
    for entry in entries:
        entry.write_bytes(payload(marker))

    caplog.set_level(logging.WARNING)
    again = prune_flow({**recipe, "output": str(tmp_path / "again")})
    assert not marker.exists(), "a cache entry ran code"
    assert shot_calls == [1, 2, 1, 2] and again["cached_shots"] == []  # recomputed, not served from the entry
    assert "cache entry" in caplog.text and "recomput" in caplog.text
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("first", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the recomputed entries serve the next run again
    third = prune_flow({**recipe, "output": str(tmp_path / "third")})
    assert shot_calls == [1, 2, 1, 2] and third["cached_shots"] == [1, 2] and not marker.exists()


def test_corrupt_checkpoint_is_recomputed_with_a_warning(tiny_recipe, shot_calls, tmp_path, monkeypatch, caplog):
    from flows.prune import prune_flow

    cache = tmp_path / "cache"
    monkeypatch.setenv("SURGEON_CACHE", str(cache))
    recipe = {**tiny_recipe, "register_model": False, "seed": 12}
    prune_flow({**recipe, "output": str(tmp_path / "first")})
    for f in (cache / "pipeline" / "shots").glob("*/model.safetensors"):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
        f.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    again = prune_flow({**recipe, "output": str(tmp_path / "again")})
    assert shot_calls == [1, 2, 1, 2] and again["cached_shots"] == []
    assert "recomput" in caplog.text
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("first", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_live_writers_partial_checkpoint_is_kept_and_reused(monkeypatch, tmp_path):
    """Two runs of the same shot at once: the second waits for the first (the key's lock) instead of deleting its
    half-written checkpoint as stale, then reuses the finished one. A partial folder whose writer is gone (no lock
    holder) is removed."""
    import threading
    import time

    from tasks import steps

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    log = logging.getLogger("test-live-writer")
    monkeypatch.setattr(steps, "get_run_logger", lambda: log)
    key = "shot-live"
    ckpt = steps.cache_root() / "shots" / key
    partial = ckpt.parent / f".{key}.abc.partial"
    holding, release, waiting = threading.Event(), threading.Event(), threading.Event()
    computed = []

    def first_writer():  # holds the key while its checkpoint is half written, then finishes it
        with steps._key_lock(key, log, "first"):
            partial.mkdir(parents=True)
            (partial / "model.safetensors").write_bytes(b"weights")
            holding.set()
            release.wait(30)
            partial.rename(ckpt)
            steps._store(key, {"report": {"shot": 1}}, ckpt)

    def compute():
        computed.append(1)
        return {"shot": 1}

    monkeypatch.setattr(log, "info", lambda msg, *a: waiting.set() if "waiting" in msg else None)
    writer = threading.Thread(target=first_writer)
    writer.start()
    assert holding.wait(30)
    result = {}
    second = threading.Thread(target=lambda: result.update(steps._checkpoint_task(key, ckpt, "second", compute)))
    second.start()
    assert waiting.wait(30)
    time.sleep(0.2)
    assert partial.is_dir() and not ckpt.exists()  # the live writer's folder is untouched
    release.set()
    writer.join(30)
    second.join(30)
    assert result["cached"] and not computed and result["report"] == {"shot": 1}

    # a writer killed mid-write leaves a partial folder and no lock holder: the next writer removes it
    dead = ckpt.parent / ".shot-dead.xyz.partial"
    dead.mkdir()
    steps._checkpoint_task("shot-dead", ckpt.parent / "shot-dead", "third",
                           lambda: (ckpt.parent / "shot-dead").mkdir() or {"shot": 2})
    assert not dead.exists() and (ckpt.parent / "shot-dead").is_dir()
