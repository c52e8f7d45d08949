"""The I/O side of a pruning run: model and data references in, checkpoints and metrics out.

Every function takes and returns paths/ids and small dicts (never models across calls), so Prefect tasks can wrap
them one-to-one. ``prune_run`` is the plain in-process driver (no Prefect, no MLflow).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgeon_core.shot import PruneOptions, linear_schedule, model_size, prune, prune_shot

from .config import PruneConfig
from .data import calibration_windows, check_seqlen, data_id, eval_windows, load_ids
from .errors import SurgeonError
from .models import load_model, model_content_hash, save_model
from .utils import atomic_write, cache_dir, sha256_file

__all__ = ["ModelRef", "DataRef", "phase_logger", "prepare_model", "build_calibration", "build_eval", "run_shot", "evaluate_dir",
           "export", "prune_run", "options_from_config", "peak_rss_gb"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


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
                        structured_update=cfg.structured_update,
                        batch_size=cfg.batch_size, autocast_dtype=_DTYPES[cfg.compute_dtype], device=cfg.device,
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
    return ModelRef(str(path), model_content_hash(path))


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
    return torch.from_numpy(np.load(path).astype(np.int64))


def _load_for_pruning(source_dir: str, cfg: PruneConfig):
    model, tok, _ = load_model(source_dir, dtype=torch.float32, device=cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return model, tok


def phase_logger(log, every: float = 0.1):
    """A ``progress(phase, done, total)`` callback that logs each phase about every ``every`` of its way."""
    last: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        step = max(1, int(total * every))
        if done == total or done - last.get(phase, 0) >= step:
            last[phase] = done
            log.info("%s %d/%d (%.0f%%)", phase, done, total, 100.0 * done / total)

    return progress


def run_shot(cfg: PruneConfig, source_dir: str, calib_path: str, shot: int, ckpt_dir: str,
             progress=None) -> dict:
    """Load ``source_dir`` (the model or the previous shot's checkpoint), prune shot ``shot`` (1-based) of the
    schedule, and write an HF-loadable checkpoint with ``state.json`` atomically. Returns the shot report.
    ``progress(phase, done, total)`` is called during curvature, costs and updates (see :func:`phase_logger`)."""
    model, tok = _load_for_pruning(source_dir, cfg)
    opts = options_from_config(cfg)
    windows = _load_windows(calib_path)
    if opts.layerwise:
        if shot != 1:
            raise SurgeonError(f"{cfg.method} is one-shot; shot {shot} does not exist")
        rep = prune(model, windows, options=opts, target_size=cfg.final_target, num_shots=1)[0]
    else:
        target = linear_schedule(cfg.final_target, cfg.shots)[shot - 1]
        rep = prune_shot(model, windows, options=opts, target_size=target, shot=shot, num_shots=cfg.shots,
                         progress=progress)
    report = rep.to_dict()
    report["peak_rss_gb"] = peak_rss_gb()
    state = {"shot": shot, "num_shots": cfg.shots, "config_hash": cfg.config_hash(), "report": report}
    save_model(model, tok, ckpt_dir, extra_files={"state.json": json.dumps(state, indent=1)})
    return report


def evaluate_dir(model_dir: str, eval_path: str, cfg: PruneConfig) -> dict:
    """Paper-protocol perplexity of a saved model over the saved evaluation windows."""
    from surgeon_core.evaluate import perplexity

    model, _, _ = load_model(model_dir, dtype=torch.float32, device=cfg.device)
    return perplexity(model, _load_windows(eval_path), batch_size=cfg.eval_batch_size)


def export(ckpt_dir: str, output_dir: str, cfg: PruneConfig, metrics: dict, source: ModelRef) -> str:
    """Write the final pruned model folder with ``recipe.yaml`` and ``manifest.json`` (hashes), atomically."""
    model, tok, _ = load_model(ckpt_dir, dtype=torch.float32)
    size, per_layer, per_type = model_size(model)
    manifest = {"source_model": source.path, "source_model_hash": source.content_hash,
                "config_hash": cfg.config_hash(), "method": cfg.method, "structure": cfg.structure,
                "target_size": cfg.final_target, "achieved_size": size, "type_sizes": per_type,
                "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = save_model(model, tok, output_dir, extra_files={"recipe.yaml": cfg.to_yaml(),
                                                          "layer_sizes.json": json.dumps(per_layer, indent=1)})
    files = {p.name: sha256_file(p, use_cache=False) for p in sorted(out.iterdir()) if p.is_file()}
    atomic_write(out / "manifest.json", json.dumps({**manifest, "files": files}, indent=1))
    return str(out)


def prune_run(cfg: PruneConfig, *, progress=None, on_shot=None) -> dict:
    """Whole run in one process (no checkpoints between shots): load, calibrate, prune T shots, evaluate, export."""
    from surgeon_core.evaluate import perplexity

    from .finetuning import finetune_model, finetune_steps_after

    t_start = time.perf_counter()
    src = prepare_model(cfg)
    calib = build_calibration(cfg, src.path)
    evald = build_eval(cfg, src.path)
    model, tok = _load_for_pruning(src.path, cfg)
    evalw = _load_windows(evald.path) if evald else None
    result = {"config": cfg.model_dump(), "source_model_hash": src.content_hash, "calibration_id": calib.data_id,
              "shots": []}
    if evalw is not None:
        result["dense"] = perplexity(model, evalw, batch_size=cfg.eval_batch_size)
    opts = options_from_config(cfg)
    schedule = [cfg.final_target] if opts.layerwise else linear_schedule(cfg.final_target, cfg.shots)
    eval_shots = {min(range(len(schedule)), key=lambda i: abs(schedule[i] - s)) + 1 for s in cfg.eval_at}
    eval_shots.add(len(schedule))

    def shot_done(rep):
        row = rep.to_dict()
        steps = finetune_steps_after(cfg, rep.shot, len(schedule))
        if steps:  # mask-preserving fine-tuning between shots / after the last
            row["finetune"] = finetune_model(model, _load_windows(calib.path), cfg, steps, rep.shot)
        row["peak_rss_gb"] = peak_rss_gb()
        if evalw is not None and rep.shot in eval_shots | ({1} if opts.layerwise else set()):
            row["eval"] = perplexity(model, evalw, batch_size=cfg.eval_batch_size)
        result["shots"].append(row)
        if on_shot:
            on_shot(row)

    prune(model, _load_windows(calib.path), options=opts, target_size=cfg.final_target, num_shots=cfg.shots,
          on_shot=shot_done, progress=progress)
    final = result["shots"][-1]
    result["achieved_size"] = final["achieved_size"]
    if "eval" in final:
        result["ppl"] = final["eval"]["ppl"]
    result["seconds"] = time.perf_counter() - t_start
    prune_secs = [sum(r["seconds"].values()) for r in result["shots"]]
    result["seconds_per_shot"] = sum(prune_secs) / len(prune_secs)
    if cfg.output:
        tmp_ckpt = cache_dir("tmp") / f"run-{cfg.config_hash()}"
        metrics = {k: result[k] for k in ("ppl", "achieved_size") if k in result}
        if "dense" in result:
            metrics["dense_ppl"] = result["dense"]["ppl"]
        save_model(model, tok, tmp_ckpt)
        result["output"] = export(str(tmp_ckpt), cfg.output, cfg, metrics, src)
    return result
