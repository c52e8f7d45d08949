"""`surgeon prune` from command-line flags (the prune flow outside the test harness): a loadable pruned folder with
its recipe and manifest, the JSON result, and one-line refusals of bad input that write nothing."""

import json

import pytest

from surgeon_core.shot import model_size
from tiny_io import save_tiny
from tiny_models import tiny_windows

pytestmark = pytest.mark.integration


def test_prune_cli_writes_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon_cli.main import main

    src = save_tiny(tmp_path / "tiny", "llama")
    calib = tmp_path / "calib.npy"
    evalf = tmp_path / "eval.npy"
    import numpy as np

    np.save(calib, tiny_windows(4, 16).numpy().astype(np.int32))
    np.save(evalf, tiny_windows(3, 16, seed=1).numpy().astype(np.int32))
    out, js = tmp_path / "pruned", tmp_path / "r.json"
    rc = main(["prune", "--model", str(src), "--method", "llm-surgeon", "--structure", "structured",
               "--target-size", "0.8", "--calibration", str(calib), "--nsamples", "4", "--seqlen", "16",
               "--shots", "2", "--output", str(out), "--eval-data", str(evalf), "--eval-seqlen", "16",
               "--json", str(js)])
    assert rc == 0
    res = json.loads(js.read_text())
    for key in ("ppl", "target_size", "achieved_size", "seconds", "seconds_per_shot"):
        assert key in res
    assert abs(res["achieved_size"] - 0.8) < 0.005
    model = AutoModelForCausalLM.from_pretrained(out)
    assert abs(model_size(model)[0] - res["achieved_size"]) < 1e-9
    assert (out / "recipe.yaml").exists() and (out / "manifest.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--target-size", "1.5"], "target_size"),
    (["--structure", "2:3:4"], "structure"),
    (["--method", "foo"], "method"),
    (["--method", "wanda"], "structured"),
    (["unknown_key=3"], "unknown recipe key 'unknown_key'"),
    (["--structure", "2:4", "--materialize"], "--materialize needs --structure structured or coupled"),
])
def test_prune_cli_bad_input_one_line(tmp_path, capsys, args, needle):
    from surgeon_cli.main import main

    src = save_tiny(tmp_path / "tiny", "llama")
    capsys.readouterr()
    rc = main(["prune", "--model", str(src), "--output", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
