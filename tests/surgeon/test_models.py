"""Model loading/saving (surgeon.models): round trips, hashing, bad files, Hub ids offline."""

import time

import pytest
import torch

from surgeon.errors import SurgeonError
from surgeon.models import load_model, model_content_hash, save_model
from tiny_io import logits, save_tiny, tiny_tokenizer
from tiny_models import tiny_model, tiny_windows

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_round_trip_identical_logits(tmp_path, family):
    model = tiny_model(family, seed=1)
    out = save_model(model, tiny_tokenizer(), tmp_path / "m", extra_files={"notes/info.txt": "hello",
                                                                          "blob.bin": b"\x00\x01"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "notes" / "info.txt").read_text() == "hello" and (out / "blob.bin").read_bytes() == b"\x00\x01"
    loaded, tok, info = load_model(out)
    ids = tiny_windows(n=2, seqlen=16)
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert info.source == "dir" and info.model_type == family and info.family == family
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert len(info.content_hash) == 64 and info.max_position_embeddings == 256
    assert tok("The fox").input_ids


def test_bf16_load(saved):
    model, _, info = load_model(saved, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16 and info.dtype == "bfloat16"
    with pytest.raises(SurgeonError, match="unknown dtype 'fp8'"):
        load_model(saved, dtype="fp8")


def test_content_hash_is_cached_and_tracks_changes(tmp_path):
    out = save_tiny(tmp_path / "m")
    first = model_content_hash(out)
    assert model_content_hash(out) == first
    (out / "tokenizer.json").write_text("{}")  # not part of the content hash: config + weights only
    assert model_content_hash(out) == first
    cfg = (out / "config.json").read_text()
    (out / "config.json").write_text(cfg + "\n")
    assert model_content_hash(out) != first


def test_overwrite_replaces_and_failed_save_leaves_nothing(tmp_path):
    target = save_tiny(tmp_path / "m", seed=0)
    h0 = model_content_hash(target)
    save_tiny(tmp_path / "m", seed=1)
    assert model_content_hash(target) != h0

    class Broken:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("partial")
            raise OSError("disk full")

    with pytest.raises(SurgeonError, match="disk full"):
        save_model(tiny_model("llama"), Broken(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(SurgeonError, match="already exists"):
        save_model(tiny_model("llama"), None, tmp_path / "m", overwrite=False)


def test_missing_paths(tmp_path):
    for ref in [tmp_path / "nope", "./no/such/model", "/no/such/model.gguf", "~/no-such-dir/x/y"]:
        with pytest.raises(SurgeonError, match="model path not found"):
            load_model(ref)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeonError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(SurgeonError, match="unsupported model file"):
        load_model(tmp_path / "weights.pt")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(tmp_path, saved):
    bad = _copy(saved, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SurgeonError, match="corrupt or truncated safetensors file .*model.safetensors"):
        load_model(bad)


def test_garbage_safetensors(tmp_path, saved):
    bad = _copy(saved, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(SurgeonError, match="corrupt or truncated safetensors"):
        load_model(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(SurgeonError, match="no weight files"):
        load_model(bad)


def test_corrupt_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SurgeonError, match="not a GGUF file"):
        load_model(junk)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(SurgeonError, match="corrupt or truncated GGUF file"):
        load_model(short)


def test_unsupported_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128,
                                                       n_positions=64))
    out = save_model(gpt2, tiny_tokenizer(), tmp_path / "gpt2")
    t0 = time.perf_counter()
    with pytest.raises(SurgeonError, match="unsupported architecture 'gpt2'.*supported model types: .*llama"):
        load_model(out)
    assert time.perf_counter() - t0 < 5  # refused from config.json, before loading weights


def test_unknown_model_type_in_config(tmp_path, saved):
    bad = _copy(saved, tmp_path / "bad")
    cfg = (bad / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "surgeon-made-up"')
    (bad / "config.json").write_text(cfg)
    with pytest.raises(SurgeonError, match="unsupported architecture 'surgeon-made-up'"):
        load_model(bad)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SurgeonError, match="HF_HUB_OFFLINE=1"):
        load_model("surgeon-test-org/no-such-model")
    with pytest.raises(SurgeonError, match="offline"):
        load_model("hf:surgeon-test-org/no-such-model")
    assert time.perf_counter() - t0 < 10


def test_hub_id_unreachable_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(SurgeonError, match="unreachable"):
        load_model("surgeon-test-org/no-such-model")
    assert time.perf_counter() - t0 < 10


@pytest.mark.realmodel
def test_smollm2_folder(smollm2_path):
    model, tok, info = load_model(smollm2_path)
    assert info.num_parameters == 134_515_008 and info.num_layers == 30 and info.max_position_embeddings == 8192
    assert tok("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    t0 = time.perf_counter()
    assert model_content_hash(smollm2_path) == info.content_hash
    assert time.perf_counter() - t0 < 1  # cached by size + mtime
