"""Prefect tasks: thin adapters over :mod:`surgeon.runner` and :mod:`surgeon.inputs`. References (paths, hashes) in, references and small
dicts out; a model never crosses a task boundary.

Caching. The expensive tasks (one per shot, fine-tuning, evaluation) carry an explicit ``cache_key_fn`` built from
what determines their result: the source model's content hash, the calibration data id, the resolved config hash
(``PruneConfig.config_hash()``: weight-relevant fields only, so not the output folder), the shot index and
``code_version()``: ``surgeon_core.__version__`` plus a hash of the library's source (Prefect's ``TASK_SOURCE``
would miss changes in the code a task calls). Each shot's checkpoint lives in ``$SURGEON_CACHE/pipeline/shots/<key>``,
written atomically, so a rerun after a crash resumes after the last completed shot, and a rerun to another output
folder only exports again.

The cache is data, never code. Prefect's result files name their own deserializer (pickle, or JSON whose
``__class__`` names any callable), so Prefect persists nothing here (``persist_result=False``, ``NO_CACHE``): each
task looks its key up in ``$SURGEON_CACHE/pipeline/records/<key>.json``, a JSON record of known shape signed with
the per-home key of :mod:`surgeon.integrity` together with the sha256 of every file of its checkpoint. A record or
checkpoint that fails any check is logged as a warning and recomputed; a shot's result says whether it was a hit.
One writer per key: a task holds ``.<key>.lock`` while it looks up and computes, so a second run of the same shot
waits and then reuses the first one's checkpoint, and only partial folders whose writer is gone are removed.
Model loading and calibration are not cached here: their outputs *are* the content ids, and ``surgeon.data``
already caches tokenization on disk.

The ``zeroshot`` task (lm-eval) is keyed by the weights' key and the task set (:func:`zeroshot_key`), so the dense
baseline is computed once per model content and task set; lm-eval's full results JSON is kept under
``$SURGEON_CACHE/pipeline/zeroshot/<key>/results.json`` for MLflow.

Retries only where they can help: fetching/loading, export and registration retry I/O errors (disk, network,
tracking server) but not bad input; shots, fine-tuning and evaluation never retry (compute: same input, same
failure).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import surgeon_core
from surgeon import integrity, inputs, runner
from surgeon import zeroshot as lm_zeroshot
from surgeon.config import PruneConfig
from surgeon.errors import SurgeonError
from surgeon.inputs import DataRef, ModelRef
from surgeon.utils import atomic_write, cache_dir, phase_logger, sha256_bytes, torch_threads
from surgeon_core.schedule import Step

from . import tracking

__all__ = ["Weights", "cache_root", "load_model", "build_calibration", "build_eval", "build_finetune", "prune_shot",
           "finetune", "evaluate", "zeroshot", "zeroshot_key", "export", "structure_report", "report_key",
           "materialize", "register"]


@dataclass(frozen=True)
class Weights:
    """A set of weights on disk: a Hugging Face folder and the key that identifies its content."""

    path: str
    key: str


def cache_root() -> Path:
    return cache_dir("pipeline")


def _record_path(key: str) -> Path:
    return cache_root() / "records" / f"{key}.json"


def _is_report(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("report"), dict) and set(value) == {"report"}


def _is_metrics(*required: str):
    def check(value) -> bool:
        return isinstance(value, dict) and all(k in value for k in required)
    return check


def _lookup(key: str, log, what: str, check, folder: Path | None = None):
    """The verified cached value of ``key``, or None (after a warning when an entry was there but failed a check,
    in which case it and its folder are removed)."""
    value, problem = integrity.read_record(_record_path(key), key, check=check, folder=folder)
    if problem is None and value is not None and folder is not None and not folder.is_dir():
        value, problem = None, "vouches for a checkpoint that is gone"
    if problem is not None:
        log.warning("%s: cache entry %s %s; recomputing it", what, key, problem)
        _record_path(key).unlink(missing_ok=True)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return value


def _store(key: str, value, folder: Path | None = None) -> None:
    integrity.write_record(_record_path(key), key, value, integrity.folder_digest(folder) if folder else None)


def _key_lock(key: str, log, what: str):
    """The lock of one cache key: held while the entry is looked up and computed."""
    return integrity.file_lock(cache_root() / "locks" / f".{key}.lock",
                               on_wait=lambda: log.info("%s: another run computes the same entry; waiting", what))


def _remove_stale_partials(folder: Path, key: str) -> None:
    """Partial folders of ``key`` left by a killed writer (called with the key's lock held: no writer is alive)."""
    for stale in folder.parent.glob(f".{key}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in folder.parent.glob(f".{key}.*.old"):
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint_task(key: str, ckpt: Path, what: str, compute):
    """The report of the checkpoint ``ckpt`` of ``key``: from its verified record, or computed and recorded."""
    log = get_run_logger()
    with _key_lock(key, log, what):
        hit = _lookup(key, log, what, _is_report, folder=ckpt)
        if hit is not None:
            log.info("%s: reusing checkpoint %s", what, ckpt)
            return {"weights": Weights(str(ckpt), key), "report": hit["report"], "cached": True}
        _remove_stale_partials(ckpt, key)
        shutil.rmtree(ckpt, ignore_errors=True)  # unrecorded: its writer died after the rename, before the record
        report = compute()
        _store(key, {"report": report}, ckpt)
    return {"weights": Weights(str(ckpt), key), "report": report, "cached": False}


def _value_task(key: str, what: str, check, compute):
    """A small JSON value of ``key``: from its verified record, or computed and recorded."""
    log = get_run_logger()
    with _key_lock(key, log, what):
        hit = _lookup(key, log, what, check)
        if hit is not None:
            return hit
        value = compute()
        _store(key, value)
    return value


def _transient(task, task_run, state) -> bool:
    """Retry I/O failures (disk, network, tracking server), not errors a retry cannot fix (bad input, bugs)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (SurgeonError, ValueError, TypeError, KeyError, AttributeError))


IO_RETRIES = dict(retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)


@functools.cache
def code_version() -> str:
    """``surgeon_core.__version__`` plus a hash of the code that computes weights and metrics, so an algorithm
    change invalidates cached shots even when nobody bumps the version."""
    files = sorted(Path(surgeon_core.__file__).parent.glob("*.py"))
    files += [Path(runner.__file__).with_name(n) for n in ("runner.py", "inputs.py", "models.py", "data.py")]
    return f"{surgeon_core.__version__}+{sha256_bytes(b''.join(f.read_bytes() for f in files))[:12]}"


def _key(kind: str, *parts) -> str:
    return f"{kind}-" + sha256_bytes(json.dumps([*parts, code_version()], default=str))[:32]


def shot_key(cfg: PruneConfig, source: Weights, calibration: DataRef, step: Step, model_hash: str) -> str:
    return _key("shot", model_hash, source.key, calibration.data_id, cfg.config_hash(), step.shot)


def finetune_key(cfg: PruneConfig, weights: Weights, data: DataRef, step: Step) -> str:
    """The pruned weights' key, the data, the step and the fine-tuning settings (in the config hash)."""
    return _key("finetune", weights.key, data.data_id, step.finetune_steps, step.shot, cfg.config_hash())


def zeroshot_key(config: PruneConfig, weights: Weights) -> str:
    """Weights content key + the task set (names, local task files, limit, lm-eval version): the dense baseline is
    computed once per model and task set, and every sweep variant or rerun reuses it."""
    e = config.eval
    fingerprint = lm_zeroshot.task_fingerprint(e.zeroshot_tasks, e.task_dir, e.zeroshot_limit)
    return _key("zeroshot", weights.key, fingerprint)


@task(name="load-model", cache_policy=NO_CACHE, **IO_RETRIES)
def load_model(config: PruneConfig) -> ModelRef:
    """Resolve the recipe's model (fetching/converting it once) to a local folder and its content hash."""
    ref = inputs.prepare_model(config)
    get_run_logger().info("model %s: %s (content %s)", config.model, ref.path, ref.content_hash[:12])
    return ref


@task(name="build-calibration", cache_policy=NO_CACHE, **IO_RETRIES)
def build_calibration(config: PruneConfig, model: ModelRef) -> DataRef:
    data = inputs.build_calibration(config, model.path)
    get_run_logger().info("calibration %s: %s windows (id %s)", config.calibration.data, data.shape,
                          data.data_id[:12])
    return data


@task(name="build-eval", cache_policy=NO_CACHE, **IO_RETRIES)
def build_eval(config: PruneConfig, model: ModelRef) -> DataRef | None:
    return inputs.build_eval(config, model.path)


@task(name="build-finetune-data", cache_policy=NO_CACHE, **IO_RETRIES)
def build_finetune(config: PruneConfig, model: ModelRef, calibration: DataRef) -> DataRef | None:
    """The windows of ``finetune.data`` (None: fine-tuning, if any, uses the calibration windows)."""
    log = get_run_logger()
    data = inputs.build_finetune(config, model, calibration, log)
    if data is not None:
        log.info("fine-tuning data %s: %s windows (id %s)", config.finetune.data, data.shape,
                 data.data_id[:12])
    return data


_CACHED = dict(cache_policy=NO_CACHE, persist_result=False)  # the product's signed records are the cache


@task(name="prune-shot", **_CACHED)
def prune_shot(config: PruneConfig, source: Weights, calibration: DataRef, step: Step, model_hash: str) -> dict:
    """Prune ``step`` of the plan starting from ``source``; the checkpoint is the cache entry."""
    shot = step.shot
    key = shot_key(config, source, calibration, step, model_hash)
    ckpt = cache_root() / "shots" / key
    log = get_run_logger()

    def compute() -> dict:
        log.info("shot %d/%d of %s to size %.4f (from %s)", shot, step.num_shots, config.method.name,
                 step.target_size, source.path)
        report = runner.prune_step_dir(config, source.path, calibration.path, step, str(ckpt),
                                       progress=phase_logger(log), log=log)
        log.info("shot %d: size %.4f (target %.4f), %s", shot, report["achieved_size"], report["target_size"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
        return report

    return _checkpoint_task(key, ckpt, f"shot {shot}", compute)


@task(name="finetune", **_CACHED)
def finetune(config: PruneConfig, weights: Weights, data: DataRef, step: Step) -> dict:
    """Mask-preserving fine-tuning after ``step`` for ``step.finetune_steps`` steps on ``data``'s windows (those of
    ``finetune.data``, or the calibration windows); the checkpoint (written atomically) is the cache entry and the
    next shot's source."""
    shot, steps = step.shot, step.finetune_steps
    key = finetune_key(config, weights, data, step)
    ckpt = cache_root() / "finetune" / key
    log = get_run_logger()

    def compute() -> dict:
        log.info("fine-tuning after shot %d: %d steps, lr %g, %s (pruned weights stay 0)", shot, steps,
                 config.finetune.lr, config.finetune.train)
        report = runner.finetune_step_dir(config, weights.path, data.path, step, str(ckpt), log=log)
        losses = report["losses"]
        log.info("fine-tuning after shot %d: loss %.4f -> %.4f in %.1f s", shot, losses[0], losses[-1],
                 report["seconds"])
        return report

    return _checkpoint_task(key, ckpt, f"fine-tuning after shot {shot}", compute)


@task(name="evaluate", **_CACHED)
def evaluate(config: PruneConfig, weights: Weights, data: DataRef) -> dict:
    """Paper-protocol perplexity of the weights over the evaluation windows."""
    def compute() -> dict:
        result = runner.evaluate_dir(weights.path, data.path, config, progress=phase_logger(get_run_logger()))
        get_run_logger().info("ppl %.3f over %d windows x %d tokens (%.1f s)", result["ppl"], result["windows"],
                              result["seqlen"], result["seconds"])
        return result

    return _value_task(_key("eval", weights.key, data.data_id), "evaluation",
                       _is_metrics("ppl", "nll", "windows", "seqlen"), compute)


@task(name="zeroshot", **_CACHED)
def zeroshot(config: PruneConfig, weights: Weights) -> dict:
    """Zero-shot accuracy (lm-eval) of the weights on the recipe's tasks. Returns per-task metrics, their average
    and ``results_file``: lm-eval's full results JSON, kept under the cache root (its sha256 in the record)."""
    key = zeroshot_key(config, weights)
    folder = cache_root() / "zeroshot" / key
    log, e = get_run_logger(), config.eval
    what = "zero-shot"
    with _key_lock(key, log, what):
        hit = _lookup(key, log, what, _is_metrics("tasks", "average", "seconds", "limit"), folder=folder)
        if hit is not None:
            return {**hit, "results_file": str(folder / "results.json")}
        shutil.rmtree(folder, ignore_errors=True)
        torch_threads(config.compute.threads)
        log.info("zero-shot (lm-eval) on %s: %s", weights.path, ", ".join(e.zeroshot_tasks))
        result = lm_zeroshot.evaluate_dir(weights.path, e.zeroshot_tasks, task_dir=e.task_dir,
                                          limit=e.zeroshot_limit, batch_size=e.batch_size,
                                          device=config.compute.device, log=log.info)
        atomic_write(folder / "results.json", json.dumps(result["results"], indent=1, default=str))
        out = {k: result[k] for k in ("tasks", "average", "seconds", "limit")}
        _store(key, out, folder)
    log.info("zero-shot average acc %s (%.1f s)", f"{out['average']:.4f}" if out["average"] is not None else "-",
             out["seconds"])
    return {**out, "results_file": str(folder / "results.json")}


@task(name="export", cache_policy=NO_CACHE, **IO_RETRIES)
def export(config: PruneConfig, weights: Weights, output: str, metrics: dict, model: ModelRef) -> str:
    return runner.export(weights.path, output, config, metrics, model, weights_key=weights.key,
                         log=get_run_logger())


def report_key(config: PruneConfig, weights: Weights, model_hash: str) -> str:
    """The final weights' key, the dense model's content and the report's settings (device, decode attention,
    threads): the same weights are measured once, whatever the output folder."""
    o = config.output
    return _key("report", weights.key, model_hash, o.report_device, o.report_decode_attention, config.compute.threads)


@task(name="structure-report", **_CACHED)
def structure_report(config: PruneConfig, weights: Weights, output: str, model: ModelRef) -> dict | None:
    """Parameters, file sizes and speed (CPU, or the GPU with ``structure_report_device``) of the materialized
    output vs the dense model (``weights`` is the key of the exported weights; the flow logs the report)."""
    return _value_task(report_key(config, weights, model.content_hash), "structure report",
                       _is_metrics("parameters", "speed"), lambda: _structure_report(config, output, model))


def _structure_report(config: PruneConfig, output: str, model: ModelRef) -> dict | None:
    from surgeon.speed import speed_summary, structure_report as measure

    log = get_run_logger()
    try:
        report = measure(output, model.path, threads=config.compute.threads, device=config.output.report_device,
                         decode_attention=config.output.report_decode_attention, log=log.info)
    except SurgeonError as exc:  # a family materialize does not cover (e.g. Qwen): the run itself is fine
        log.warning("no structure report: %s", exc)
        return None
    log.info("materialized: %d -> %d parameters (prunable kept %.4f); %s", report["parameters"]["dense_total"],
             report["parameters"]["materialized_total"], report["parameters"]["prunable_fraction"],
             speed_summary(report["speed"]))
    return report


@task(name="materialize", cache_policy=NO_CACHE, **IO_RETRIES)
def materialize(output: str) -> dict:
    """The exported folder without its all-zero units, written to ``OUTPUT-materialized`` (replacing an earlier
    one); ``{"skipped": reason}`` when nothing is entirely zero."""
    from surgeon.materialized_export import NothingToMaterialize, materialize_dir

    dest = Path(f"{str(output).rstrip('/')}-materialized")
    if dest.exists() and (dest / "materialize.json").exists():
        shutil.rmtree(dest)
    try:
        report = materialize_dir(output, dest)
    except NothingToMaterialize as exc:  # the pruning itself succeeded
        get_run_logger().warning("not materialized: %s", exc)
        return {"skipped": str(exc)}
    get_run_logger().info("materialized %s: %d -> %d parameters", dest, report["parameters_before"]["total"],
                          report["parameters_after"]["total"])
    return report


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register(run_id: str, model_dir: str, name: str, tags: dict) -> dict:
    """Register the folder as a version of model ``name`` (an MLflow transformers model), or link the run to the
    version that holds the same weights (:func:`tasks.tracking.register_model`)."""
    result = tracking.register_model(run_id, model_dir, name, tags)
    get_run_logger().info("%s %s version %s (weights %s)", "reusing" if result["reused"] else "registered", name,
                          result["version"], result["weights_sha256"][:12])
    return result
