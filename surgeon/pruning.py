"""The I/O side of a pruning run: model and data references in, checkpoints and metrics out.

Every function takes and returns paths/ids and small dicts (never models across calls), so Prefect tasks can wrap
them one-to-one. ``prune_run`` is the plain in-process driver (no Prefect, no MLflow).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgeon_core.schedule import Step, plan
from surgeon_core.shot import (NonFiniteCurvatureError, PruneOptions, RoundedCurvatureError, ShotReport, Structure,
                                model_size, prune_shot, run_step)

from .config import PruneConfig
from .data import calibration_windows, check_seqlen, data_id, eval_windows, load_ids
from .errors import SurgeonError
from .models import load_model, model_content_hash, save_model
from .outputs import check_output, manifest_files, output_lock
from .utils import atomic_write, cache_dir, keep_freed_memory, phase_logger, sha256_file

__all__ = ["ModelRef", "DataRef", "phase_logger", "prepare_model", "validate_model", "build_calibration", "build_eval",
           "preflight", "run_shot", "shot_with_fallback", "evaluate_dir", "export", "prune_run", "options_from_config",
           "peak_rss_gb"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    path: str
    content_hash: str


@dataclass(frozen=True)
class DataRef:
    path: str
    data_id: str
    shape: tuple[int, ...]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def options_from_config(cfg: PruneConfig) -> PruneOptions:
    return PruneOptions(method=cfg.method, structure=cfg.structure, damping_a=cfg.damping_a, damping_g=cfg.damping_g,
                        fisher=cfg.fisher, fisher_samples=cfg.fisher_samples, max_correlate=cfg.max_correlate,
                        structured_update=cfg.structured_update, coupled_score=cfg.coupled_score,
                        batch_size=cfg.batch_size, autocast_dtype=_DTYPES[cfg.compute_dtype], device=cfg.device,
                        gram_dtype=_DTYPES[cfg.gram_dtype], checkpoint_layers=cfg.checkpoint_layers,
                        inverse_dtype=torch.float64 if cfg.inverse_dtype == "fp64" else torch.float32,
                        baseline_dtype=torch.float64 if cfg.baseline_dtype == "fp64" else None,
                        update_concurrent_batches=cfg.update_concurrent,
                        seed=cfg.seed, first_order=cfg.first_order, first_order_scale=cfg.first_order_scale)


def prepare_model(cfg: PruneConfig) -> ModelRef:
    """Resolve ``cfg.model`` to a local HF folder (fetching/converting registered names and GGUF files once)."""
    from .fetch import fetch_model, known_models

    ref = cfg.model
    if ref in known_models():
        path = fetch_model(ref, cache_dir("models") / ref)
    elif ref.lower().endswith(".gguf"):
        src = Path(ref).expanduser()
        if not src.is_file():
            raise SurgeonError(f"model path not found: {src}")
        path = cache_dir("models") / f"gguf-{sha256_file(src)[:16]}"
        if not (path / "config.json").exists():
            model, tok, _ = load_model(src)
            save_model(model, tok, path)
    else:
        path = Path(ref).expanduser()
        if not path.is_dir():
            model, tok, _ = load_model(ref)  # Hub id (fails fast offline) or a clear error
            path = cache_dir("models") / ("hub-" + ref.replace("/", "--"))
            save_model(model, tok, path)
    path = Path(path).resolve()
    content_hash = model_content_hash(path)
    validate_model(str(path), cfg, content_hash)
    return ModelRef(str(path), content_hash)


def validate_model(model_path: str, cfg: PruneConfig, content_hash: str | None = None) -> None:
    """Load the model once on the CPU and refuse, with one line, what a shot would fail on hours later: corrupt or
    truncated files, an unsupported architecture, NaN/Inf weights (all in :func:`load_model`), and an N:M
    structure whose M does not divide every prunable layer's input dimension. A success is remembered per content
    hash and structure (``$SURGEON_CACHE/validated``), so a large model is read for this only once."""
    from surgeon_core.adapters import adapter_for, prunable_linears

    marker = cache_dir("validated") / f"{content_hash[:32]}-{cfg.structure.replace(':', 'of')}" \
        if content_hash else None
    if marker is not None and marker.is_file():
        return
    model, _, _ = load_model(model_path, dtype=torch.float32, device="cpu")
    st = Structure.parse(cfg.structure)
    if st.kind == "nm":
        bad = [(n, lin.in_features) for n, lin in prunable_linears(model, adapter_for(model)).items()
               if lin.in_features % st.m]
        if bad:
            raise SurgeonError(f"{st} sparsity needs every prunable layer's input dimension divisible by {st.m}: "
                               f"{bad[0][0]} has {bad[0][1]} inputs ({len(bad)} layer(s) affected)")
    del model
    if marker is not None:
        atomic_write(marker, model_path)


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # a folder without tokenizer: only .npy data can be used
        return None


def _save_windows(windows: torch.Tensor, did: str, kind: str) -> DataRef:
    path = cache_dir("data") / f"{kind}-{did[:20]}.npy"
    if not path.exists():
        buf = __import__("io").BytesIO()
        np.save(buf, windows.numpy().astype(np.int32))
        atomic_write(path, buf.getvalue())
    return DataRef(str(path), did, tuple(windows.shape))


def _model_config(model_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def build_calibration(cfg: PruneConfig, model_path: str) -> DataRef:
    """Tokenize the calibration source once and draw ``nsamples`` windows of ``seqlen`` tokens (seeded)."""
    check_seqlen(cfg.seqlen, _model_config(model_path))
    ids = load_ids(cfg.calibration, _tokenizer(model_path), split=cfg.calibration_split,
                   column=cfg.calibration_column, join=None)
    if ids.dim() == 1 and ids.numel() < cfg.nsamples * cfg.seqlen:
        raise SurgeonError(f"calibration corpus {cfg.calibration} has {ids.numel()} tokens, fewer than nsamples x "
                           f"seqlen = {cfg.nsamples} x {cfg.seqlen} = {cfg.nsamples * cfg.seqlen} (the windows would "
                           "mostly repeat); give more text or fewer/shorter windows")
    windows = calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.calibration_seed)
    did = data_id(windows, source=cfg.calibration, seed=cfg.calibration_seed)
    return _save_windows(windows, did, "calib")


def build_eval(cfg: PruneConfig, model_path: str) -> DataRef | None:
    if cfg.eval_data is None:
        return None
    seqlen = cfg.eval_seqlen or cfg.seqlen
    check_seqlen(seqlen, _model_config(model_path))
    ids = load_ids(cfg.eval_data, _tokenizer(model_path), split=cfg.eval_split, column=cfg.eval_column)
    windows = eval_windows(ids, seqlen, cfg.eval_max_windows)
    did = data_id(windows, source=cfg.eval_data)
    return _save_windows(windows, did, "eval")


def _load_windows(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))


def preflight(cfg: PruneConfig) -> tuple[ModelRef, DataRef, DataRef | None]:
    """Every check that can fail on the user's input, before any pruning: the output folder (policy of
    :func:`surgeon.outputs.check_output`), the model (:func:`validate_model`), calibration and evaluation data
    (found, long enough, ``seqlen`` within the model's context). Raises :class:`SurgeonError`; writes nothing
    but the caches (converted models, token ids). Returns what it resolved."""
    if cfg.output:
        check_output(cfg.output, config_hash=cfg.config_hash(), overwrite=cfg.overwrite)
    src = prepare_model(cfg)
    if cfg.output:
        check_output(cfg.output, config_hash=cfg.config_hash(), source_model=src.content_hash,
                     overwrite=cfg.overwrite)
    return src, build_calibration(cfg, src.path), build_eval(cfg, src.path)


def _load_for_pruning(source_dir: str, cfg: PruneConfig):
    model, tok, _ = load_model(source_dir, dtype=torch.float32, device=cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()  # reuse the batches' large buffers instead of page-faulting them in again
    return model, tok


def run_shot(cfg: PruneConfig, source_dir: str, calib_path: str, shot: int, ckpt_dir: str,
             progress=None) -> dict:
    """Load ``source_dir`` (the model or the previous shot's checkpoint), prune shot ``shot`` (1-based) of the
    schedule, and write an HF-loadable checkpoint with ``state.json`` atomically. Returns the shot report.
    ``progress(phase, done, total)`` is called during curvature, costs and updates (see :func:`phase_logger`).

    ``cfg.nproc > 1``: the shot runs data-parallel over that many processes (torchrun, :mod:`surgeon.distributed`);
    inside such a process group only rank 0 writes the checkpoint."""
    import torch.distributed as dist

    in_group = dist.is_available() and dist.is_initialized()
    if cfg.nproc > 1 and not in_group:
        from .distributed import launch_shot

        return launch_shot(cfg, source_dir, calib_path, shot, ckpt_dir, progress=progress)
    model, tok = _load_for_pruning(source_dir, cfg)
    opts = options_from_config(cfg)
    windows = _load_windows(calib_path)
    steps = plan(cfg.final_target, cfg.shots, layerwise=opts.layerwise)
    if not 1 <= shot <= len(steps):
        raise SurgeonError(f"shot {shot} does not exist: the plan has {len(steps)}")
    rep = shot_with_fallback(model, windows, opts, steps[shot - 1], progress=progress)
    report = rep.to_dict()
    report["peak_rss_gb"] = peak_rss_gb()
    state = {"shot": shot, "num_shots": cfg.shots, "config_hash": cfg.config_hash(), "report": report}
    if not in_group or dist.get_rank() == 0:
        save_model(model, tok, ckpt_dir, extra_files={"state.json": json.dumps(state, indent=1)})
    return report


def shot_with_fallback(model, windows: torch.Tensor, opts: PruneOptions, step: Step, progress=None,
                       log: logging.Logger | None = None) -> ShotReport:
    """One shot; if calibration overflows under fp16/bf16 compute (NaN/Inf curvature factors, detected before any
    weight changes) it is logged and the shot reruns in fp32; if bf16 factor matmuls on a CPU left factors that are
    not positive definite (:class:`RoundedCurvatureError`), it reruns with fp32 factor matmuls. Damping escalations
    (factors that were not positive definite) are logged too; ``report.extra`` records both."""
    log = log or _log
    shot = step.shot
    try:
        rep = run_step(model, windows, options=opts, step=step, progress=progress)
    except NonFiniteCurvatureError as exc:
        if opts.autocast_dtype is None and opts.gram_dtype is None:
            raise
        rounded = isinstance(exc, RoundedCurvatureError)  # only the factor matmuls need fp32 then
        log.warning("shot %d: %s; rerunning the shot in fp32%s", shot, exc, " factor matmuls" if rounded else "")
        fp32 = dataclasses.replace(opts, gram_dtype=None) if rounded else \
            dataclasses.replace(opts, autocast_dtype=None, gram_dtype=None)
        rep = run_step(model, windows, options=fp32, step=step, progress=progress)
        rep.extra["fp32_retry"] = str(exc)
    if rep.damping_escalations:
        log.warning("shot %d: damping escalated for %d curvature factor(s) that were not positive definite",
                    shot, rep.damping_escalations)
    return rep


def evaluate_dir(model_dir: str, eval_path: str, cfg: PruneConfig) -> dict:
    """Paper-protocol perplexity of a saved model over the saved evaluation windows."""
    from surgeon_core.evaluate import perplexity

    model, _, _ = load_model(model_dir, dtype=torch.float32, device=cfg.device)
    return perplexity(model, _load_windows(eval_path), batch_size=cfg.eval_batch_size)


def export(ckpt_dir: str, output_dir: str, cfg: PruneConfig, metrics: dict, source: ModelRef) -> str:
    """Write the final pruned model folder with ``recipe.yaml`` and ``manifest.json`` (hashes), atomically."""
    check_output(output_dir, config_hash=cfg.config_hash(), source_model=source.content_hash,
                 overwrite=cfg.overwrite)
    model, tok, _ = load_model(ckpt_dir, dtype=torch.float32)
    size, per_layer, per_type = model_size(model)
    manifest = {"source_model": source.path, "source_model_hash": source.content_hash,
                "config_hash": cfg.config_hash(), "method": cfg.method, "structure": cfg.structure,
                "target_size": cfg.final_target, "achieved_size": size, "type_sizes": per_type,
                "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "recipe": cfg.model_dump()}

    def write_manifest(folder: Path) -> None:  # inside the temporary folder: the manifest is there before the rename
        atomic_write(folder / "manifest.json", json.dumps({**manifest, "files": manifest_files(folder)}, indent=1))

    out = save_model(model, tok, output_dir, extra_files={"recipe.yaml": cfg.to_yaml(),
                                                          "layer_sizes.json": json.dumps(per_layer, indent=1)},
                     finalize=write_manifest)
    return str(out)


def _zeroshot_in_memory(model, tokenizer, cfg: PruneConfig) -> dict:
    """Zero-shot accuracy (lm-eval) of the model as it is in memory; lm-eval's full results left out."""
    from .zeroshot import evaluate_model

    result = evaluate_model(model, tokenizer, cfg.zeroshot_tasks, task_dir=cfg.task_dir, limit=cfg.zeroshot_limit,
                            batch_size=cfg.eval_batch_size, log=_log_info)
    return {k: v for k, v in result.items() if k != "results"}


def _log_info(msg: str) -> None:
    import logging

    logging.getLogger("surgeon.pruning").info(msg)


def prune_run(cfg: PruneConfig, *, progress=None, on_shot=None) -> dict:
    """Whole run in one process (no checkpoints between shots): load, calibrate, prune T shots, evaluate, export.

    Bad input raises :class:`SurgeonError` (the same one-line messages as ``surgeon prune``) before any work; the
    output folder is locked for the whole run (:func:`surgeon.outputs.output_lock`)."""
    if cfg.output:
        check_output(cfg.output, config_hash=cfg.config_hash(), overwrite=cfg.overwrite)
        with output_lock(cfg.output):
            return _prune_run(cfg, progress=progress, on_shot=on_shot)
    return _prune_run(cfg, progress=progress, on_shot=on_shot)


def _prune_run(cfg: PruneConfig, *, progress=None, on_shot=None) -> dict:
    from surgeon_core.evaluate import perplexity

    from .finetuning import finetune_model, finetune_steps_after

    t_start = time.perf_counter()
    src, calib, evald = preflight(cfg)
    model, tok = _load_for_pruning(src.path, cfg)
    evalw = _load_windows(evald.path) if evald else None
    result = {"config": cfg.model_dump(), "source_model_hash": src.content_hash, "calibration_id": calib.data_id,
              "shots": []}
    if evalw is not None:
        result["dense"] = perplexity(model, evalw, batch_size=cfg.eval_batch_size)
    if cfg.zeroshot_tasks:
        result["dense_zeroshot"] = _zeroshot_in_memory(model, tok, cfg)
    opts = options_from_config(cfg)
    steps = plan(cfg.final_target, cfg.shots, layerwise=opts.layerwise, eval_at=cfg.eval_at,
                 finetune_steps=cfg.finetune_steps, final_finetune_steps=cfg.final_finetune_steps)
    eval_shots = {s.shot for s in steps if s.evaluate}
    schedule = steps

    def shot_done(rep):
        row = rep.to_dict()
        steps = finetune_steps_after(cfg, rep.shot, len(schedule))
        if steps:  # mask-preserving fine-tuning between shots / after the last
            row["finetune"] = finetune_model(model, _load_windows(calib.path), cfg, steps, rep.shot)
        row["peak_rss_gb"] = peak_rss_gb()
        if evalw is not None and rep.shot in eval_shots | ({1} if opts.layerwise else set()):
            row["eval"] = perplexity(model, evalw, batch_size=cfg.eval_batch_size)
        if cfg.zeroshot_tasks and rep.shot in eval_shots:
            row["zeroshot"] = _zeroshot_in_memory(model, tok, cfg)
        result["shots"].append(row)
        if on_shot:
            on_shot(row)

    windows = _load_windows(calib.path)
    for step in steps:
        shot_done(shot_with_fallback(model, windows, opts, step, progress=progress))
    final = result["shots"][-1]
    result["achieved_size"] = final["achieved_size"]
    if cfg.zeroshot_tasks:
        result["zeroshot"] = final.get("zeroshot")
    if "eval" in final:
        result["ppl"] = final["eval"]["ppl"]
    result["seconds"] = time.perf_counter() - t_start
    prune_secs = [sum(r["seconds"].values()) for r in result["shots"]]
    result["seconds_per_shot"] = sum(prune_secs) / len(prune_secs)
    if cfg.output:
        tmp_ckpt = cache_dir("tmp") / f"run-{cfg.config_hash()}-{os.getpid()}"
        metrics = {k: result[k] for k in ("ppl", "achieved_size") if k in result}
        if "dense" in result:
            metrics["dense_ppl"] = result["dense"]["ppl"]
        save_model(model, tok, tmp_ckpt)
        try:
            result["output"] = export(str(tmp_ckpt), cfg.output, cfg, metrics, src)
        finally:
            shutil.rmtree(tmp_ckpt, ignore_errors=True)
    return result
