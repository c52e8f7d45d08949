"""Paper-protocol perplexity (surgeon_core.evaluate) against Hugging Face's own loss."""

import math

import numpy as np
import pytest
import torch

from surgeon_core.evaluate import perplexity, windows_from_ids
from tiny_models import tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def hf_ppl(model, windows):
    losses = []
    with torch.no_grad():
        for w in windows:
            losses.append(model(input_ids=w[None], labels=w[None]).loss.double().item())
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_ppl_is_exp_mean_window_loss(family):
    model = tiny_model(family)
    windows = tiny_windows(n=5, seqlen=24)
    res = perplexity(model, windows)
    assert res["ppl"] == pytest.approx(hf_ppl(model, windows), rel=1e-5)
    assert res["windows"] == 5 and res["seqlen"] == 24 and res["tokens"] == 120
    assert res["nll"] == pytest.approx(math.log(res["ppl"]))


def test_batching_does_not_change_ppl():
    model = tiny_model("llama")
    windows = tiny_windows(n=5, seqlen=16)
    one = perplexity(model, windows, batch_size=1)["ppl"]
    three = perplexity(model, windows, batch_size=3)["ppl"]
    assert three == pytest.approx(one, rel=1e-5)


def test_progress_callback_reaches_total():
    seen = []
    perplexity(tiny_model("llama"), tiny_windows(n=5, seqlen=8), batch_size=2,
               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_windows_drop_the_remainder():
    ids = torch.arange(100)
    w = windows_from_ids(ids, 32)
    assert w.shape == (3, 32)
    assert torch.equal(w.flatten(), ids[:96])
    assert windows_from_ids(ids, 32, max_windows=2).shape == (2, 32)
    assert windows_from_ids(ids, 100).shape == (1, 100)


def test_windows_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        windows_from_ids(torch.arange(10), 32)
    with pytest.raises(ValueError, match="expected seqlen"):
        windows_from_ids(torch.zeros(2, 16, dtype=torch.long), 32)
    with pytest.raises(ValueError):
        perplexity(tiny_model("llama"), torch.zeros(0, 8, dtype=torch.long))


@pytest.mark.realmodel
def test_smollm2_dense_ppl_on_a1_windows(smollm2_path, repo_data):
    """Dense SmolLM2 (Q4_1 de-quantized weights) on the first 8 A1 evaluation windows: 29.874 measured on CPU."""
    from surgeon.models import load_model

    model, _, info = load_model(smollm2_path)
    assert info.model_type == "llama" and info.num_parameters == 134_515_008
    windows = torch.from_numpy(np.load(repo_data / "protocols" / "a1" / "eval_windows.npy")[:8].astype(np.int64))
    res = perplexity(model, windows)
    assert res["ppl"] == pytest.approx(29.874, abs=0.02)
