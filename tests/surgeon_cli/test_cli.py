"""The `surgeon` command line: eval on a tiny saved model, JSON output, one-line errors, nothing written."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from surgeon import data as D
from surgeon.models import load_model
from surgeon_cli.main import main
from surgeon_core.evaluate import perplexity
from tiny_io import TEXT, save_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_text_file_with_json(capsys, tmp_path, model_dir, corpus):
    js = tmp_path / "out" / "result.json"
    rc, out, err = run(capsys, "eval", "--model", model_dir, "--data", corpus, "--seqlen", 32, "--json", js,
                       "--batch-size", 2, "--threads", 1)
    assert rc == 0, err
    res = json.loads(js.read_text())
    for key in ("ppl", "tokens", "windows", "seqlen", "model_hash", "data_id", "seconds", "tokens_per_second"):
        assert key in res
    assert res["seqlen"] == 32 and res["tokens"] == res["windows"] * 32
    assert f"ppl {res['ppl']:.3f}" in out

    model, tok, info = load_model(model_dir)
    windows = D.eval_windows(D.load_ids(corpus, tok), 32)
    assert res["windows"] == windows.shape[0] and res["model_hash"] == info.content_hash
    assert res["ppl"] == pytest.approx(perplexity(model, windows)["ppl"], rel=1e-6)
    assert math.isclose(res["nll"], math.log(res["ppl"]), rel_tol=1e-9)


def test_eval_npy_windows_and_max_windows(capsys, tmp_path, model_dir):
    arr = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0)).numpy().astype(np.int32)
    np.save(tmp_path / "w.npy", arr)
    js = tmp_path / "r.json"
    rc, out, err = run(capsys, "eval", "-m", model_dir, "-d", tmp_path / "w.npy", "-L", 16, "--max-windows", 4,
                       "--json", js)
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert res["windows"] == 4 and res["tokens"] == 64
    model, _, _ = load_model(model_dir)
    assert res["ppl"] == pytest.approx(perplexity(model, torch.from_numpy(arr[:4]).long())["ppl"], rel=1e-6)


def test_eval_builtin_default(capsys, model_dir):
    rc, out, err = run(capsys, "eval", "--model", model_dir, "--data", "builtin:stdlib-docs", "--seqlen", 64,
                       "--max-windows", 2)
    assert rc == 0, err
    assert out.startswith("ppl ")


def _bad_cases(tmp_path, model_dir, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("The fox.")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "The quick brown fox"}\n')
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, 5000, 3]))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    (tmp_path / "adir").mkdir()
    m, d = str(model_dir), str(corpus)
    return {
        "missing model": (["--model", tmp_path / "nope", "--data", d, "--seqlen", 16], "model path not found"),
        "missing data": (["--model", m, "--data", tmp_path / "nope.txt", "--seqlen", 16], "data file not found"),
        "seqlen beyond context": (["--model", m, "--data", d, "--seqlen", 512], "beyond the model's context"),
        "shorter than a window": (["--model", m, "--data", short, "--seqlen", 64], "fewer than one window"),
        "empty corpus": (["--model", m, "--data", empty, "--seqlen", 16], "corpus is empty"),
        "unknown column": (["--model", m, "--data", rows, "--column", "body", "--seqlen", 4],
                           "column 'body' not found"),
        "bad dtype": (["--model", m, "--data", d, "--seqlen", 16, "--dtype", "fp8"], "unknown dtype 'fp8'"),
        "corrupt weights": (["--model", broken, "--data", d, "--seqlen", 16], "corrupt or truncated safetensors"),
        "json is a folder": (["--model", m, "--data", d, "--seqlen", 16, "--json", tmp_path / "adir"],
                             "is a folder"),
        "ids beyond vocab": (["--model", m, "--data", big, "--seqlen", 2], "beyond the tokenizer's"),
        "unknown builtin": (["--model", m, "--data", "builtin:nope", "--seqlen", 16], "unknown builtin"),
        "hub dataset offline": (["--model", m, "--data", "hf:surgeon-test/none", "--seqlen", 16], "offline"),
    }


def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, model_dir, corpus):
    for name, (args, message) in _bad_cases(tmp_path, model_dir, corpus).items():
        js = tmp_path / f"{name.replace(' ', '_')}.json"
        if "--json" not in args:
            args = [*args, "--json", js]
        rc, out, err = run(capsys, "eval", *args)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2, (name, err)
        assert len(errors) == 1 and message in errors[0], (name, err)
        assert err.rstrip().splitlines()[-1] == errors[0], name
        assert "Traceback" not in err, name
        assert not js.exists(), name


def test_debug_shows_traceback(capsys, tmp_path, corpus):
    rc, out, err = run(capsys, "eval", "--model", tmp_path / "nope", "--data", corpus, "--seqlen", 16, "--debug")
    assert rc == 2 and "Traceback" in err and "error: model path not found" in err


def test_usage_errors_and_fetch_unknown(capsys, tmp_path):
    rc, out, err = run(capsys, "eval", "--model", "x")
    assert rc == 2 and err.strip() == ("error: nothing to evaluate: give --data and --seqlen (perplexity) and/or "
                                       "--tasks (zero-shot)")
    rc, out, err = run(capsys, "fetch-model", "nope", "--output", tmp_path / "o")
    assert rc == 2 and err.strip() == "error: unknown model 'nope' (known: gemma3-270m, smollm2-135m)"
    assert not (tmp_path / "o").exists()


def test_console_entry_point_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "surgeon_cli", "eval", "--model", str(tmp_path / "nope"),
                           "--data", "builtin:stdlib-docs", "--seqlen", "16"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model path not found: {tmp_path / 'nope'}"]
    assert proc.stdout == ""
    help_ = subprocess.run([sys.executable, "-m", "surgeon_cli", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "fetch-model" in help_.stdout and "eval" in help_.stdout


def test_prune_help_lists_the_config_sections_and_the_method_registry(capsys):
    from surgeon.config import SECTIONS
    from surgeon_core.methods import METHODS, OPTIONS

    rc, out, err = run(capsys, "prune", "--help")
    assert rc == 0, err
    flags = out[: out.index("Config fields")]
    for flag in ("--config", "--model", "--method", "--structure", "--target-size", "--shots", "--calibration",
                 "--nsamples", "--seqlen", "--eval-data", "--eval-seqlen", "--eval-max-windows", "--output", "--json",
                 "--device", "--seed", "--no-register", "--materialize", "--finetune-steps"):
        assert flag in flags, flag
    for gone in ("--compute-dtype", "--gram-dtype", "--update-concurrent", "--nproc", "--threads", "--first-order"):
        assert gone not in flags, gone
    sections = out[out.index("Config fields"):]
    for name, section in SECTIONS.items():
        assert f"\n{name}:" in sections
        for field in section.model_fields:
            assert (f"{name}.{field}" if field not in OPTIONS else f"method.{field}") in sections, field
    for name, spec in METHODS.items():
        assert name in sections and spec.help in " ".join(sections.split())
    for text in ("H200", "BENCHMARKS", "faster"):
        assert text not in out


def test_prune_key_value_fields_and_flags_for_config_fields(capsys, tmp_path, model_dir):
    args = ["prune", "--model", model_dir, "--output", tmp_path / "o"]
    rc, out, err = run(capsys, *args, "compute.dtype=bf16", "shotz=2")
    assert rc == 2 and err.strip() == "error: unknown recipe key 'shotz'"
    rc, out, err = run(capsys, *args, "finetune.lr=-1")
    assert rc == 2 and err.strip().startswith("error: invalid recipe value for 'finetune.lr'")
    rc, out, err = run(capsys, *args, "--compute-dtype", "bf16")  # a config field without a flag
    assert rc == 2 and "compute_dtype=VALUE" in err and "key=value" in err
    rc, out, err = run(capsys, *args, "data=x.txt")  # 'data' alone is two fields
    assert rc == 2 and "ambiguous" in err and "calibration.data" in err
    assert not (tmp_path / "o").exists()


def test_bench_arguments_and_list(capsys, tmp_path):
    rc, out, err = run(capsys, "bench")
    assert rc == 2 and err.strip() == "error: give a benchmark CONFIG, --list or --report (exactly one)"
    rc, out, err = run(capsys, "bench", "--list", "--device", "cuda")
    assert rc == 2 and "--device apply to running a benchmark CONFIG" in err
    rc, out, err = run(capsys, "bench", tmp_path / "nope.yaml")
    assert rc == 2 and "benchmark config not found" in err
