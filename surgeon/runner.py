"""The runner: executes the steps of a run's plan (``PruneConfig.plan()``) on a model: prune (a shot of LLM Surgeon
or a layer-wise baseline's pass), mask-preserving fine-tuning, evaluation. No Prefect and no MLflow, so it runs on
a bare GPU image.

Two ways in, one implementation:
- :func:`run`: the whole run in one process (``surgeon bench``, scripts): the one loop over the plan, with an
  optional checkpoint folder after every step from which a later call resumes.
- :func:`prune_step_dir`, :func:`finetune_step_dir`, :func:`evaluate_dir`: one phase of one step from a checkpoint
  folder to a checkpoint folder (the Prefect flow's cached tasks, the torchrun worker).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from surgeon_core.evaluate import perplexity
from surgeon_core.finetune import (FinetuneOptions, TeacherTargets, finetune, mask_violations, pruning_masks,
                                   teacher_targets, validation_split)
from surgeon_core.adapters import adapter_for
from surgeon_core.curvature import factor_memory, passes_to_fit
from surgeon_core.methods import DTYPES, PruneOptions
from surgeon_core.placement import local_part, shard_weights
from surgeon_core.schedule import Step
from surgeon_core.shot import NonFiniteCurvatureError, RoundedCurvatureError, ShotReport, model_size, run_step

from . import launcher
from .config import PruneConfig
from .errors import SurgeonError
from .inputs import RANDOM, DataRef, ModelRef, load_source_model, load_windows, preflight
from .models import load_model, save_model
from .outputs import check_output, holds_export, manifest_files, output_lock
from .sharded_load import can_load_sharded, load_sharded, random_sharded, save_sharded
from .utils import atomic_write, keep_freed_memory, torch_threads

__all__ = ["Runner", "run", "check_factor_memory", "zeroshot", "prune_step_dir", "finetune_step_dir", "evaluate_dir",
           "export", "peak_memory", "shot_with_fallback"]

_log = logging.getLogger("surgeon.runner")
SIZE_TOLERANCE = 0.05  # a shot's achieved size may differ from its target by whole rows/units, never by more
Progress = Callable[[str, int, int], None]


def peak_memory(device: str | torch.device = "cpu") -> dict:
    """Peak resident memory of this process, and of the GPU when ``device`` is one."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    device = torch.device(device)
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return out


def shot_with_fallback(model, windows: torch.Tensor | None, opts: PruneOptions, step: Step,
                       progress: Progress | None = None, log: logging.Logger | None = None) -> ShotReport:
    """One step; if calibration overflowed under fp16/bf16 compute (NaN/Inf factors, found before any weight
    changes) the step reruns in fp32, and if bf16 factor matmuls on a CPU left factors that are not positive
    definite, with fp32 factor matmuls. Both, and damping escalations, are logged and kept in ``report.extra``."""
    log = log or _log
    try:
        rep = run_step(model, windows, options=opts, step=step, progress=progress)
    except NonFiniteCurvatureError as exc:
        if opts.autocast_dtype is None and opts.gram_dtype is None:
            raise
        rounded = isinstance(exc, RoundedCurvatureError)  # only the factor matmuls need fp32 then
        log.warning("shot %d: %s; rerunning the shot in fp32%s", step.shot, exc, " factor matmuls" if rounded else "")
        fp32 = dataclasses.replace(opts, gram_dtype=None) if rounded else \
            dataclasses.replace(opts, autocast_dtype=None, gram_dtype=None)
        rep = run_step(model, windows, options=fp32, step=step, progress=progress)
        rep.extra["fp32_retry"] = str(exc)
    if rep.damping_escalations:
        log.warning("shot %d: damping escalated for %d curvature factor(s) that were not positive definite",
                    step.shot, rep.damping_escalations)
    return rep


def finetune_options(cfg: PruneConfig, steps: int, shot: int) -> FinetuneOptions:
    """The recipe's fine-tuning settings for ``steps`` steps after shot ``shot`` (its own data order per shot).
    bf16 compute follows ``compute.dtype: bf16`` (fp32 master weights and AdamW state); fp16 fine-tunes in fp32."""
    f = cfg.finetune
    return FinetuneOptions(steps=steps, lr=f.lr, train=f.train, schedule=f.schedule,
                           warmup_steps=min(f.warmup, steps), batch_size=f.batch_size,
                           autocast_dtype=torch.bfloat16 if cfg.compute.dtype == "bf16" else None,
                           device=cfg.compute.device, seed=cfg.method.seed + 1000 * shot, loss=f.loss,
                           kd_weight=f.kd_weight)


def finetune_summary(row: dict) -> dict:
    """What a step's fine-tuning chose: steps run, the kept step (0: the weights from before it), the validation
    loss before fine-tuning and at the kept step, and how many windows it trained and validated on."""
    val = dict((int(s), v) for s, v in row.get("validation") or [])
    best = row.get("best_step")
    return {"shot": row.get("shot"), "loss": row.get("loss"), "steps": row.get("steps"),
            "planned_steps": row.get("planned_steps"), "best_step": best, "stopped_early": row.get("stopped_early"),
            "kept_pre_finetune": row.get("kept_pre_finetune"), "val_loss_before": val.get(0),
            "val_loss_best": val.get(best) if best is not None else None,
            "train_windows": row.get("train_windows"), "validation_windows": row.get("validation_windows")}


def load_for_pruning(source: str, cfg: PruneConfig, device: str | None = None):
    """The model (in ``compute.model_dtype``, on ``device`` or the compute device) and tokenizer of a folder or a
    random architecture, with the recipe's thread count."""
    model, tok = load_source_model(source, cfg, device)
    torch_threads(cfg.compute.threads)
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()  # reuse the batches' large buffers instead of page-faulting them in again
    return model, tok


def check_factor_memory(cfg: PruneConfig, model, device_bytes: int, log: logging.Logger | None = None) -> dict | None:
    """The K-FAC factors' bytes per GPU (surgeon_core.curvature.factor_memory) under the recipe's compute keys,
    logged; a :class:`SurgeonError` before any work when their peak alone exceeds what ``device_bytes`` leaves beside
    the weights, naming the settings that would fit. None for methods without K-FAC factors."""
    opts = cfg.options()
    if opts.layerwise or opts.spec.curvature == "none":
        return None
    c, adapter = cfg.compute, adapter_for(model)
    spread = dict(world=c.nproc, shard=c.shard_factors)
    plan = factor_memory(model, adapter, passes=c.factor_passes, storage=c.factor_storage, **spread)
    (log or _log).info("K-FAC factors per GPU: at most %.1f GB during the curvature pass, %.1f GB kept after it",
                       plan["peak"] / 1e9, plan["stored"] / 1e9)
    budget = device_bytes - sum(local_part(p).numel() * p.element_size() for p in model.parameters())
    if plan["peak"] <= budget:
        return plan
    fits = passes_to_fit(model, adapter, budget, storage="packed", **spread)
    advice = (f"compute.factor_passes={fits} compute.factor_storage=packed would need at most "
              f"{factor_memory(model, adapter, passes=fits, storage='packed', **spread)['peak'] / 1e9:.1f} GB"
              if fits else "no number of layer-block passes fits: spread the factors over more GPUs "
              "(compute.nproc with compute.shard_factors=true)")
    raise SurgeonError(f"the K-FAC factors need {plan['peak'] / 1e9:.1f} GB per GPU during the curvature pass, more "
                       f"than the {budget / 1e9:.1f} GB the GPU leaves beside the weights; {advice}")


class Runner:
    """The phases of a step on one in-memory model: :meth:`prune`, :meth:`finetune`, :meth:`evaluate`."""

    def __init__(self, cfg: PruneConfig, model, calibration: torch.Tensor | None, evaluation: torch.Tensor | None = None,
                 *, finetune_windows: torch.Tensor | None = None, progress: Progress | None = None,
                 log: logging.Logger | None = None):
        self.cfg, self.model = cfg, model
        self.calibration, self.evaluation = calibration, evaluation
        # fine-tuning trains and validates on finetune.data's windows when given, else on the calibration windows
        self.finetune_windows = finetune_windows if finetune_windows is not None else calibration
        self.options = cfg.options()
        self.progress, self.log = progress, log or _log
        self._memory_checked = False
        self.teacher: TeacherTargets | None = None
        self._split: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def prune(self, step: Step) -> dict:
        device = next(self.model.parameters()).device
        if device.type == "cuda" and not self._memory_checked:  # before the first shot's work
            check_factor_memory(self.cfg, self.model, torch.cuda.get_device_properties(device).total_memory, self.log)
            self._memory_checked = True
        try:
            rep = shot_with_fallback(self.model, self.calibration, self.options, step, progress=self.progress,
                                     log=self.log)
        except NonFiniteCurvatureError as exc:  # fp32 overflowed too: the model's own values are the cause
            raise SurgeonError(f"shot {step.shot}: {exc}; the model's weights or activations are too large to "
                               "prune (weights untouched)") from exc
        if abs(rep.achieved_size - step.target_size) > SIZE_TOLERANCE:
            raise SurgeonError(f"shot {step.shot} left size {rep.achieved_size:.4f} against its target "
                               f"{step.target_size:.4f}: the costs could not rank the weights (non-finite or "
                               "degenerate weights?)")
        return {**rep.to_dict(), **peak_memory(self.cfg.compute.device)}

    def validation_split(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(training, validation or None) windows of fine-tuning: ``finetune.holdout`` of them, at least
        ``holdout_min``, whole groups of overlapping windows at a time, so the validation windows share no tokens
        with the training windows (:func:`surgeon_core.finetune.validation_split`). The same split for every shot."""
        if self._split is None:
            f, windows = self.cfg.finetune, self.finetune_windows
            if f.holdout <= 0:
                self._split = (windows, None)
            else:
                n = windows.shape[0]
                n_val = min(n - 1, max(f.holdout_min, round(f.holdout * n)))
                if n_val < 1:
                    raise SurgeonError(f"finetune.holdout {f.holdout} of {n} fine-tuning windows leaves no window "
                                       "to train or to validate on")
                train, val = validation_split(windows, n_val)
                if len(val) < min(f.holdout_min, n_val):
                    raise SurgeonError(f"only {len(val)} of {n} fine-tuning windows share no tokens with the others "
                                       f"(finetune.holdout_min is {f.holdout_min}): draw more windows from a longer "
                                       "text, or set finetune.holdout=0")
                self._split = (windows[train], windows[val])
        return self._split

    def prepare_teacher(self, dense_model=None) -> None:
        """The distillation targets (``finetune.loss`` kd or mix): ``dense_model``'s top-k next-token distribution
        on the training windows, computed once (default: the runner's model, dense before the first shot)."""
        f = self.cfg.finetune
        if f.loss == "ce" or self.teacher is not None:
            return
        train, _ = self.validation_split()
        t0 = time.perf_counter()
        self.teacher = teacher_targets(dense_model if dense_model is not None else self.model, train,
                                       k=f.kd_topk, batch_size=f.batch_size, device=self.cfg.compute.device,
                                       autocast_dtype=torch.bfloat16 if self.cfg.compute.dtype == "bf16" else None)
        self.log.info("teacher: top-%d next-token distributions of %d x %d tokens, %.1f MB, %.1f s", f.kd_topk,
                      train.shape[0], train.shape[1], self.teacher.nbytes / 2**20, time.perf_counter() - t0)

    def finetune(self, step: Step) -> dict:
        """Mask-preserving fine-tuning after ``step``; every pruned weight is checked to be exactly 0 after it.
        With validation windows the best weights on them are kept: those from before fine-tuning when it never
        lowered the validation loss (logged, ``kept_pre_finetune`` in the report)."""
        cfg, f, n = self.cfg, self.cfg.finetune, step.finetune_steps
        train, held = self.validation_split()
        if f.loss != "ce" and self.teacher is None:
            raise SurgeonError(f"finetune.loss {f.loss} needs the dense model's targets: Runner.prepare_teacher "
                               "before the first shot")
        masks = pruning_masks(self.model)
        validate = (lambda m: self._loss(m, held)) if held is not None else None  # noqa: E731
        every = max(1, n // 10)

        def on_step(i: int, loss: float, lr: float) -> None:
            if i % every == 0 or i == n:
                self.log.info("finetune %d/%d %s loss %.4f lr %.3g", i, n, f.loss, loss, lr)

        def on_validate(i: int, value: float) -> None:
            self.log.info("finetune %d/%d validation loss %.4f", i, n, value)

        rep = finetune(self.model, train, options=finetune_options(cfg, n, step.shot), on_step=on_step,
                       validate=validate, validate_every=f.validate_every or every,
                       patience=f.patience if held is not None else 0, teacher=self.teacher,
                       on_validate=on_validate)
        bad = mask_violations(self.model, masks)
        if bad:  # only a library bug can get here: never hand such weights on
            raise SurgeonError(f"fine-tuning after shot {step.shot} changed {bad} pruned weights")
        if held is not None:
            val = dict((s, v) for s, v in rep.validation)
            if rep.kept_pre_finetune:
                self.log.warning("fine-tuning after shot %d did not lower the validation loss (%.4f before it): the "
                                 "weights from before fine-tuning are kept", step.shot, val[0])
            else:
                self.log.info("fine-tuning after shot %d: validation loss %.4f -> %.4f, weights of step %d of %d "
                              "kept%s", step.shot, val[0], val[rep.best_step], rep.best_step, n,
                              f" (stopped after {rep.steps})" if rep.stopped_early else "")
        return {**rep.to_dict(), "shot": step.shot, "train_windows": int(train.shape[0]),
                "validation_windows": 0 if held is None else int(held.shape[0]), **peak_memory(cfg.compute.device)}

    def _loss(self, model, windows: torch.Tensor) -> float:
        try:
            return perplexity(model, windows, batch_size=self.cfg.finetune.batch_size,
                              device=self.cfg.compute.device)["nll"]
        except FloatingPointError:
            return math.inf

    def evaluate_also(self, also: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Perplexity on each of ``eval.also``'s texts (name -> windows)."""
        return {name: perplexity(self.model, w, batch_size=self.cfg.eval.batch_size, device=self.cfg.compute.device)
                for name, w in also.items()}

    def evaluate(self) -> dict | None:
        if self.evaluation is None:
            return None
        progress = (lambda i, n: self.progress("eval", i, n)) if self.progress else None
        return perplexity(self.model, self.evaluation, batch_size=self.cfg.eval.batch_size,
                          device=self.cfg.compute.device, progress=progress)


def zeroshot(cfg: PruneConfig, model, tokenizer, log: logging.Logger | None = None) -> dict | None:
    """Zero-shot accuracy (lm-eval) of the in-memory model on ``eval.zeroshot_tasks`` (None when there are none);
    lm-eval's full results are left out."""
    e = cfg.eval
    if not e.zeroshot_tasks:
        return None
    from .zeroshot import evaluate_model  # lm-eval is heavy: imported only when tasks are asked for

    result = evaluate_model(model, tokenizer, e.zeroshot_tasks, task_dir=e.task_dir, limit=e.zeroshot_limit,
                            batch_size=e.batch_size, log=(log or _log).info)
    return {k: v for k, v in result.items() if k != "results"}


# ------------------------------------------------------------------------------------------- one process, one loop
def _signature(cfg: PruneConfig, inputs: tuple[ModelRef, DataRef, DataRef | None, DataRef | None],
               also: dict[str, DataRef] | None = None) -> dict:
    src, calib, evald, ft = inputs
    out = {"config_hash": cfg.config_hash(), "model": src.content_hash, "calibration": calib.data_id,
           "eval": evald.data_id if evald else None, "eval_batch_size": cfg.eval.batch_size}
    if ft is not None:
        out["finetune_data"] = ft.data_id
    if also:
        out["eval_also"] = {name: ref.data_id for name, ref in also.items()}
    return out


def _eval_also(cfg: PruneConfig, model_path: str) -> dict[str, DataRef]:
    """The windows of ``eval.also``'s texts, made like the main evaluation's."""
    from .inputs import build_eval

    return {name: build_eval(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"data": ref})}), model_path)
            for name, ref in cfg.eval.also.items()}


def _save_checkpoint(folder: Path, model, state: dict) -> None:
    """Weights first, then the state that names them: a state file always describes the weights beside it."""
    from safetensors.torch import save_model as save_weights

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_weights(model, str(tmp))
    tmp.replace(folder / "model.safetensors")
    atomic_write(folder / "state.json", json.dumps(state, indent=1, default=str))


EVAL_SIGNATURE = ("eval", "eval_batch_size", "eval_also")  # what only the evaluation depends on


def _read_state(folder: Path | None) -> dict | None:
    if folder is None or not (folder / "state.json").is_file():
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("result"), dict):
            raise ValueError("state.json is not a checkpoint state")
    except (OSError, ValueError) as exc:
        _log.warning("checkpoint %s is corrupt (%s); recomputing from the start", folder, exc)
        return None
    return state


def _load_checkpoint_weights(folder: Path, model) -> bool:
    """The checkpoint's weights into ``model``; False (model untouched) when the file is corrupt."""
    from safetensors.torch import load_model as load_weights

    try:  # the file is read whole before any weight is replaced: a failure leaves the model as loaded
        load_weights(model, str(folder / "model.safetensors"), device=str(next(model.parameters()).device))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for corrupt files
        _log.warning("checkpoint %s is corrupt (%s); recomputing from the start", folder,
                     str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return False
    return True


def _resume(folder: Path | None, model, signature: dict, steps: list[Step]) -> tuple[dict | None, bool]:
    """(the checkpoint's result, whether its evaluations must be redone). A finished run whose checkpoint differs
    only in the evaluation and evaluates its final weights only is re-evaluated (weights not loaded yet then: the
    dense model is evaluated first); any other difference is refused."""
    state = _read_state(folder)
    if state is None:
        return None, False
    old = state.get("signature")
    if old != signature:
        same_weights = isinstance(old, dict) and all(old.get(k) == v for k, v in signature.items()
                                                     if k not in EVAL_SIGNATURE)
        done = state["result"].get("steps", [])
        final_only = not any(s.evaluate for s in steps[:-1])
        if not (same_weights and final_only and len(done) == len(steps)):
            raise SurgeonError(f"checkpoint {folder} holds another run (config, model or data differ); remove it or "
                               "choose another folder")
        return state["result"], True
    return (state["result"], False) if _load_checkpoint_weights(folder, model) else (None, False)


def run(cfg: PruneConfig, *, checkpoint: str | Path | None = None, progress: Progress | None = None,
        on_step: Callable[[dict], None] | None = None, stop_after: int | None = None,
        log: logging.Logger | None = None) -> dict:
    """The whole run in this process: resolve the inputs, then every step of the plan (prune, fine-tune, evaluate),
    then export to ``cfg.output.path`` if set. ``checkpoint``: a folder written after every step; a later call with
    the same config resumes after the last finished step. ``stop_after``: stop after that many steps (the result
    says so; the checkpoint resumes). Bad input raises :class:`SurgeonError` before any work."""
    if cfg.output.path:
        check_output(cfg.output.path, config_hash=cfg.config_hash(), overwrite=cfg.output.overwrite,
                     sources=[cfg.model])
        with output_lock(cfg.output.path):
            return _run(cfg, checkpoint, progress, on_step, stop_after, log or _log)
    return _run(cfg, checkpoint, progress, on_step, stop_after, log or _log)


def _run(cfg, checkpoint, progress, on_step, stop_after, log) -> dict:
    t_start = time.perf_counter()
    log.info("resolving %s and tokenizing the calibration%s data", cfg.model,
             " and evaluation" if cfg.eval.data else "")
    inputs = preflight(cfg, log)
    src, calib, evald, ft = inputs
    log.info("loading %s on %s", src.path, cfg.compute.device)
    model, tok = load_for_pruning(src.path, cfg)
    runner = Runner(cfg, model, load_windows(calib.path), load_windows(evald.path) if evald else None,
                    finetune_windows=load_windows(ft.path) if ft else None, progress=progress, log=log)
    folder = Path(checkpoint) if checkpoint else None
    also_refs = _eval_also(cfg, src.path)
    also = {name: load_windows(ref.path) for name, ref in also_refs.items()}
    signature = _signature(cfg, inputs, also_refs)
    steps = cfg.plan()
    result, reevaluate = _resume(folder, model, signature, steps)
    if reevaluate:
        result = _reevaluate(folder, model, runner, also, result, signature, log)
        if result is not None:
            result["eval_id"] = evald.data_id if evald else None
    if result is None:
        result = {"config": cfg.model_dump(), "config_hash": cfg.config_hash(), "source_model_hash": src.content_hash,
                  "source_path": src.path, "calibration_id": calib.data_id, "eval_id": evald.data_id if evald else None,
                  "device": _device_name(cfg.compute.device), "steps": [], "prune_seconds": 0.0}
        if ft is not None:
            result["finetune_data_id"] = ft.data_id
        result.update(_dense_evaluations(runner, also, log))
        if cfg.eval.zeroshot_tasks:
            result["dense_zeroshot"] = zeroshot(cfg, model, tok, log)
    done = len(result["steps"])
    if done:
        log.info("resumed from %s after step %d of %d", folder, done, len(steps))
    if any(s.finetune_steps for s in steps[done:]):
        if not done:
            runner.prepare_teacher()  # the model is still the dense one
        elif cfg.finetune.loss != "ce":
            dense, _ = load_for_pruning(src.path, cfg)
            runner.prepare_teacher(dense)
            del dense
    for step in steps[done:]:
        if stop_after is not None and len(result["steps"]) >= stop_after:
            result["stopped_after"] = stop_after
            break
        log.info("shot %d/%d: %s %s to size %.4f", step.shot, step.num_shots, cfg.method.name, cfg.method.structure,
                 step.target_size)
        t0 = time.perf_counter()
        row = runner.prune(step)
        result["prune_seconds"] += time.perf_counter() - t0
        if step.finetune_steps:
            row["finetune"] = runner.finetune(step)
        if step.evaluate:
            row.update(_evaluations(runner, also))
            if cfg.eval.zeroshot_tasks:
                row["zeroshot"] = zeroshot(cfg, model, tok, log)
        log.info("shot %d/%d: size %.4f (target %.4f)%s; %s", step.shot, step.num_shots, row["achieved_size"],
                 step.target_size, f", ppl {row['eval']['ppl']:.3f}" if row.get("eval") else "",
                 ", ".join(f"{k} {v:.1f} s" for k, v in row["seconds"].items()))
        result["steps"].append(row)
        if folder is not None:
            _save_checkpoint(folder, model, {"signature": signature, "result": result})
        if on_step:
            on_step(row)
    return _finish(cfg, result, runner, tok, src, t_start)


def _reevaluate(folder: Path, model, runner: Runner, also: dict, result: dict, signature: dict,
                log: logging.Logger) -> dict | None:
    """A finished run's evaluations redone for a changed evaluation: the dense model's, then the final weights'
    (from the checkpoint, which is rewritten with the new signature)."""
    log.info("checkpoint %s: a finished run with another evaluation; evaluating the dense and the final weights",
             folder)
    result = {k: v for k, v in result.items() if k not in ("dense", "dense_also")}
    result.update(_dense_evaluations(runner, also, log))
    if not _load_checkpoint_weights(folder, model):
        return None
    final = {k: v for k, v in result["steps"][-1].items() if k != "eval_also"}
    final.update(_evaluations(runner, also))
    result["steps"] = [*result["steps"][:-1], final]
    _save_checkpoint(folder, model, {"signature": signature, "result": result})
    return result


def _evaluations(runner: Runner, also: dict) -> dict:
    """The current weights' perplexity (``eval``) and, when there is one, on each ``eval.also`` text."""
    out = {"eval": runner.evaluate()}
    if also and out["eval"] is not None:
        out["eval_also"] = runner.evaluate_also(also)
    return out


def _dense_evaluations(runner: Runner, also: dict, log: logging.Logger) -> dict:
    """The dense model's evaluations as a result holds them: ``dense`` (absent without evaluation data) and
    ``dense_also``."""
    if runner.evaluation is not None:
        log.info("dense evaluation: %d windows x %d tokens", *runner.evaluation.shape)
    out = {}
    dense = runner.evaluate()
    if dense is not None:
        out["dense"] = dense
        log.info("dense ppl %.3f (%d windows x %d tokens)", dense["ppl"], dense["windows"], dense["seqlen"])
    if also:
        out["dense_also"] = runner.evaluate_also(also)
    return out


def _finish(cfg, result, runner, tok, src: ModelRef, t_start: float) -> dict:
    rows = result["steps"]
    if not rows or result.get("stopped_after"):
        result["seconds"] = time.perf_counter() - t_start
        return result
    final = rows[-1]
    tuned = [finetune_summary(r["finetune"]) for r in rows if r.get("finetune")]
    if tuned:
        result["finetune"] = tuned
        result["finetune_best_step"] = tuned[-1]["best_step"]
    result["achieved_size"] = final["achieved_size"]
    if final.get("eval"):
        result["ppl"] = final["eval"]["ppl"]
    if final.get("eval_also"):
        result["ppl_also"] = {name: e["ppl"] for name, e in final["eval_also"].items()}
    if final.get("zeroshot"):
        result["zeroshot"] = final["zeroshot"]
    result["seconds"] = time.perf_counter() - t_start
    result["seconds_per_shot"] = sum(sum(r["seconds"].values()) for r in rows) / len(rows)
    result.update(peak_memory(cfg.compute.device))
    if cfg.output.path:
        metrics = {k: result[k] for k in ("ppl", "achieved_size") if k in result}
        if "dense" in result:
            metrics["dense_ppl"] = result["dense"]["ppl"]
        result["output"] = export_model(runner.model, tok, cfg.output.path, cfg, metrics, src)
    return result


def _device_name(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(d)
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------ one phase, folder to folder (flow)
def _load_sharded_for_pruning(source: str, cfg: PruneConfig):
    """:func:`load_for_pruning` with the decoder weights sharded over the running process group: each rank reads
    (a safetensors folder) or draws (a random architecture) only its slices; anything else is loaded whole on the
    CPU and then sharded."""
    dtype, device = DTYPES[cfg.compute.model_dtype], cfg.compute.device
    if can_load_sharded(source):
        model, tok = load_sharded(source, dtype=dtype, device=device)
    elif source.startswith(RANDOM):
        model, tok = random_sharded(source, dtype=dtype, device=device, seed=cfg.method.seed), None
    else:
        model, tok = load_for_pruning(source, cfg, device="cpu")
        shard_weights(model, adapter_for(model))
    torch_threads(cfg.compute.threads)
    return model, tok


def prune_step_dir(cfg: PruneConfig, source_dir: str, calib_path: str, step: Step, ckpt_dir: str,
                   progress: Progress | None = None, log: logging.Logger | None = None) -> dict:
    """Load ``source_dir`` (the model or the previous step's checkpoint), prune ``step`` and write an HF-loadable
    checkpoint with ``state.json``, atomically. Returns the shot report. ``cfg.compute.nproc > 1``: the shot runs
    data-parallel over that many processes (:mod:`surgeon.launcher`); inside such a group only rank 0 writes."""
    import torch.distributed as dist

    in_group = dist.is_available() and dist.is_initialized()
    if cfg.compute.nproc > 1 and not in_group:
        return launcher.launch_shot(cfg, source_dir, calib_path, step, ckpt_dir, progress=progress)
    sharded = in_group and cfg.compute.shard_weights
    model, tok = _load_sharded_for_pruning(source_dir, cfg) if sharded else load_for_pruning(source_dir, cfg)
    report = Runner(cfg, model, load_windows(calib_path), progress=progress, log=log).prune(step)
    state = {"step": step.to_dict(), "config_hash": cfg.config_hash(), "report": report}
    extra = {"state.json": json.dumps(state, indent=1)}
    if sharded:  # every rank writes its slices; they are joined into whole tensors file by file
        save_sharded(model, tok, ckpt_dir, extra_files=extra)
    elif not in_group or dist.get_rank() == 0:
        save_model(model, tok, ckpt_dir, extra_files=extra)
    return report


def finetune_step_dir(cfg: PruneConfig, source_dir: str, windows_path: str, step: Step, ckpt_dir: str,
                      log: logging.Logger | None = None, dense_dir: str | None = None) -> dict:
    """Load a checkpoint, fine-tune it ``step.finetune_steps`` steps on the windows at ``windows_path`` (those of
    ``finetune.data``, or the calibration windows; pruned weights stay exactly 0) and write an HF-loadable checkpoint
    with ``state.json``, atomically. Returns the report. The kd and mix losses take the teacher from ``dense_dir``
    (default: the recipe's model, resolved as the run resolves it)."""
    runner = Runner(cfg, None, None, finetune_windows=load_windows(windows_path), log=log)
    if cfg.finetune.loss != "ce":
        from .inputs import prepare_model

        dense, _ = load_for_pruning(dense_dir or prepare_model(cfg).path, cfg)
        runner.prepare_teacher(dense)
        del dense
    model, tok = load_for_pruning(source_dir, cfg)
    runner.model = model
    report = runner.finetune(step)
    state = {"step": step.to_dict(), "config_hash": cfg.config_hash(), "report": report}
    save_model(model, tok, ckpt_dir, extra_files={"state.json": json.dumps(state, indent=1)})
    return report


def evaluate_dir(model_dir: str, eval_path: str, cfg: PruneConfig, progress: Progress | None = None) -> dict:
    """Paper-protocol perplexity of a saved model over the saved evaluation windows. With ``compute.shard_weights``
    and ``nproc`` > 1 the model's weights are sharded over that many processes (torchrun), each reading only its
    slices, and the windows are shared among them."""
    import torch.distributed as dist

    in_group = dist.is_available() and dist.is_initialized()
    sharded = cfg.compute.shard_weights and cfg.compute.nproc > 1 and can_load_sharded(model_dir)
    if sharded and not in_group:
        return launcher.launch_eval(cfg, model_dir, eval_path, progress=progress)
    if sharded:
        model, _ = load_sharded(model_dir, dtype=torch.float32, device=cfg.compute.device)
    else:
        model, _, _ = load_model(model_dir, dtype=torch.float32, device=cfg.compute.device)
    torch_threads(cfg.compute.threads)
    return Runner(cfg, model, None, load_windows(eval_path), progress=progress).evaluate()


def export_model(model, tok, output_dir: str, cfg: PruneConfig, metrics: dict, source: ModelRef,
                 weights_key: str | None = None) -> str:
    """Write the final pruned model folder with ``recipe.yaml``, ``layer_sizes.json`` and ``manifest.json`` (hashes
    of every file), atomically: a folder that exists is complete. ``weights_key``: the pipeline's key of these
    weights, kept in the manifest (:func:`export` skips a folder that already holds them)."""
    check_output(output_dir, config_hash=cfg.config_hash(), source_model=source.content_hash,
                 overwrite=cfg.output.overwrite, sources=[cfg.model, source.path])
    size, per_layer, per_type = model_size(model)
    if abs(size - cfg.final_target) > SIZE_TOLERANCE:  # the weights handed on must be the pruned ones
        raise SurgeonError(f"the pruned weights have size {size:.4f} against the target {cfg.final_target:.4f} "
                           f"(tolerance {SIZE_TOLERANCE}); refusing to export them to {output_dir}")
    manifest = {"source_model": source.path, "source_model_hash": source.content_hash,
                "config_hash": cfg.config_hash(), "method": cfg.method.name, "structure": cfg.method.structure,
                "target_size": cfg.final_target, "achieved_size": size, "type_sizes": per_type,
                "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "recipe": cfg.recipe()}  # what recipe.yaml holds (surgeon verify compares the two)
    if weights_key:
        manifest["weights_key"] = weights_key

    def write_manifest(folder: Path) -> None:  # inside the temporary folder: the manifest is there before the rename
        atomic_write(folder / "manifest.json", json.dumps({**manifest, "files": manifest_files(folder)}, indent=1))

    out = save_model(model, tok, output_dir, extra_files={"recipe.yaml": cfg.to_yaml(),
                                                          "layer_sizes.json": json.dumps(per_layer, indent=1)},
                     finalize=write_manifest)
    return str(out)


def export(ckpt_dir: str, output_dir: str, cfg: PruneConfig, metrics: dict, source: ModelRef,
           weights_key: str | None = None, log: logging.Logger | None = None) -> str:
    """:func:`export_model` of a checkpoint folder; with ``weights_key``, a folder that already holds these weights
    with the same recipe, source and metrics, every file matching its manifest, is left as it is."""
    if weights_key and not cfg.output.overwrite and holds_export(
            output_dir, weights_key=weights_key, config_hash=cfg.config_hash(), source_model_hash=source.content_hash,
            metrics=json.loads(json.dumps(metrics))):
        (log or _log).info("%s already holds these weights (manifest verified): not rewritten", output_dir)
        return str(Path(output_dir).expanduser().resolve())
    model, tok, _ = load_model(ckpt_dir, dtype=torch.float32)
    path = export_model(model, tok, output_dir, cfg, metrics, source, weights_key)
    (log or _log).info("wrote %s", path)
    return path


