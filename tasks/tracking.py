"""All MLflow calls of the project: tracking URI, one parent run per flow, per-shot metrics, artifacts, registry.

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set (any tracking server), else an explicit local SQLite file
``sqlite:///$SURGEON_HOME/mlflow.db`` (``SURGEON_HOME`` defaults to ``~/.llm-surgeon``), whose artifacts go to
``mlartifacts/`` next to the database file -- never a CWD-relative default, which bites workers started elsewhere.

Everything goes through an explicit ``MlflowClient`` and run id (no fluent "active run"): Prefect may run tasks in
other threads, and an explicit id cannot leak between runs. Metrics use ``step = shot`` (step 0 is the dense model).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from surgeon.integrity import file_lock

from . import plots

__all__ = ["TrackedRun", "surgeon_home", "tracking_uri", "ui_url", "ui_command", "start_run", "log_shot", "log_outcome",
           "log_directory", "register_model", "weights_hash", "version_with_weights", "model_version", "set_alias",
           "alias_version", "set_version_tags", "registered_name", "log_zeroshot", "log_finetune"]

ALIAS = "champion"


def surgeon_home() -> Path:
    return Path(os.environ.get("SURGEON_HOME") or "~/.llm-surgeon").expanduser()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = surgeon_home().resolve()
    return f"sqlite:///{home / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ui_url() -> str:
    """Base URL of the MLflow UI: the tracking server itself, else ``$SURGEON_MLFLOW_UI`` (``mlflow ui``'s default)."""
    uri = tracking_uri()
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/")
    return os.environ.get("SURGEON_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def ui_command() -> str | None:
    """The command that serves the UI for a local SQLite store (None when tracking goes to a server)."""
    db = _sqlite_file(tracking_uri())
    if db is None:
        return None
    port = urlparse(ui_url()).port or 5000
    return f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port {port}"


def _client():
    # before the first mlflow import: no telemetry calls (offline machines; one project reports hangs)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from mlflow import MlflowClient

    uri = tracking_uri()
    db = _sqlite_file(uri)
    if db is None and uri not in _READY_STORES and urlparse(uri).scheme in ("http", "https"):
        _check_server(uri)
        _READY_STORES.add(uri)
    if db is None or uri in _READY_STORES:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    # two processes creating or migrating one SQLite store at once both fail: one at a time, lock beside it
    with file_lock(db.parent / f".{db.name}.lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates/migrates the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
    _READY_STORES.add(uri)
    return client


_READY_STORES: set[str] = set()  # SQLite stores this process has created or found complete, servers that answered
SERVER_TIMEOUT_S = 5.0


def _check_server(uri: str) -> None:
    """One quick request to the server's ``/health``: MLflow's client would retry a dead server for minutes."""
    import urllib.error
    import urllib.request

    from surgeon.errors import SurgeonError

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S) as response:
            response.read(64)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SurgeonError(f"MLflow tracking server {uri} is unreachable ({reason}); start it (make services) or "
                           "unset MLFLOW_TRACKING_URI to track in the local SQLite store") from None


# MLflow 3's UI opens an experiment in its GenAI (traces) view unless this tag names classic model development
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:  # an experiment made before the tag existed; a user's choice stays
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    db = _sqlite_file(tracking_uri())
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _provenance() -> dict[str, str]:
    import torch
    import transformers

    import surgeon_core

    tags = {"surgeon_core": surgeon_core.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if sha:
            tags["git_sha"] = sha
    return tags


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str

    @property
    def url(self) -> str:
        return f"{ui_url()}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def _params(params: dict) -> list:
    from mlflow.entities import Param

    def text(v) -> str:
        return json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    return [Param(k, text(v)[:6000]) for k, v in params.items()]


@contextlib.contextmanager
def start_run(name: str, *, experiment: str, params: dict | None = None, tags: dict | None = None,
              parent_run_id: str | None = None) -> Iterator[TrackedRun]:
    """A run that ends FINISHED when the block succeeds, FAILED (KILLED on Ctrl-C) when it raises."""
    client = _client()
    all_tags = {**_provenance(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(_experiment_id(client, experiment), run_name=name, tags=all_tags)
    tracked = TrackedRun(run.info.run_id, run.info.experiment_id)
    try:
        if params:
            client.log_batch(tracked.run_id, params=_params(params))
        yield tracked
    except KeyboardInterrupt:
        client.set_terminated(tracked.run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(tracked.run_id, "FAILED")
        raise
    client.set_terminated(tracked.run_id, "FINISHED")


def _metrics(values: dict[str, float], step: int) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]


def log_shot(run_id: str, step: int, report: dict | None = None, evaluation: dict | None = None) -> None:
    """Metrics of one shot (step = shot; step 0 = dense): size overall and per type, estimated loss, seconds per
    phase, peak RSS, and ppl where evaluated."""
    values: dict[str, float] = {}
    if report is not None:
        values.update({"size": report["achieved_size"], "target_size": report["target_size"],
                       "estimated_loss": report["estimated_loss"],
                       "damping_escalations": report.get("damping_escalations", 0),
                       "peak_rss_gb": report.get("peak_rss_gb")})
        values.update({f"size/{t}": v for t, v in report["type_sizes"].items()})
        values.update({f"seconds/{k}": v for k, v in report["seconds"].items()})
    elif step == 0:
        values["size"] = 1.0
    if evaluation is not None:
        values.update({"ppl": evaluation["ppl"], "nll": evaluation["nll"],
                       "seconds/eval": evaluation.get("seconds")})
    values = {k: v for k, v in values.items() if v is not None and v == v}  # drop NaN (layer-wise baselines)
    _client().log_batch(run_id, metrics=_metrics(values, step))


def log_finetune(run_id: str, shot: int, report: dict, *, first_step: int = 0) -> None:
    """The loss curve of the fine-tuning after shot ``shot``: ``finetune/loss/shot_<shot>`` (step = fine-tuning step
    within the shot), ``finetune/loss`` (one curve over all shots: step = steps so far), the validation loss the
    same two ways (``finetune/val_loss/shot_<shot>``, ``finetune/val_loss``; step 0 = before fine-tuning), and at
    step = shot the kept step (``finetune/best_step``; 0 and ``finetune/kept_pre_finetune`` 1: the weights from
    before fine-tuning), the first and last loss, seconds and optimizer-state size."""
    client = _client()
    metrics = []
    for i, (loss, lr) in enumerate(zip(report["losses"], report["lrs"]), start=1):
        metrics += _metrics({f"finetune/loss/shot_{shot}": loss}, step=i)
        metrics += _metrics({"finetune/loss": loss, "finetune/lr": lr}, step=first_step + i)
    for i, value in report.get("validation") or []:  # held-out loss; step 0: before fine-tuning
        metrics += _metrics({f"finetune/val_loss/shot_{shot}": value}, step=int(i))
        metrics += _metrics({"finetune/val_loss": value}, step=first_step + int(i))
    metrics += _metrics({"finetune/loss_first": report["losses"][0], "finetune/loss_last": report["losses"][-1],
                         "seconds/finetune": report["seconds"], "finetune/state_gb": report["state_bytes"] / 1e9,
                         "finetune/best_step": report.get("best_step"),
                         "finetune/kept_pre_finetune": (float(report["kept_pre_finetune"])
                                                        if report.get("validation") else None),
                         "finetune/peak_rss_gb": report.get("peak_rss_gb"),
                         "finetune/peak_gpu_gb": (report["peak_gpu_bytes"] / 1e9
                                                  if report.get("peak_gpu_bytes") else None)}, step=shot)
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def log_outcome(run_id: str, *, recipe_yaml: str, shot_reports: list[dict], ppl_points: list[tuple[float, float]],
                dense_ppl: float | None, summary: dict, finetune_reports: list[dict] | None = None) -> None:
    """Artifacts of a finished prune run: recipe, per-layer allocation table, heatmap, ppl-vs-size plot, summary,
    and the fine-tuning loss curves when there were any."""
    client = _client()
    with tempfile.TemporaryDirectory(prefix="surgeon-mlflow-") as tmp:
        d = Path(tmp)
        (d / "recipe.yaml").write_text(recipe_yaml)
        (d / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if shot_reports:
            (d / "allocation.csv").write_text(plots.allocation_csv(shot_reports))
            (d / "plots").mkdir()
            last = shot_reports[-1]
            plots.allocation_heatmap(last["layer_sizes"], d / "plots" / "allocation_heatmap.png",
                                     title=f"fraction kept per layer (size {last['achieved_size']:.3f})")
            if ppl_points:
                plots.ppl_vs_size({"pruned": ppl_points}, d / "plots" / "ppl_vs_size.png", dense_ppl=dense_ppl)
            if finetune_reports:
                plots.finetune_curves(finetune_reports, d / "plots" / "finetune_loss.png")
        client.log_artifacts(run_id, str(d))
    final = {k: summary[k] for k in ("ppl", "dense_ppl", "achieved_size", "ppl_ratio") if summary.get(k) is not None}
    client.log_batch(run_id, metrics=_metrics({f"final/{k}": v for k, v in final.items()}, step=0))


def _report_names(report: dict) -> tuple[str, str]:
    """(metric prefix, artifact file) of a structure report: the CPU one keeps the plain names, a GPU one gets its
    own, so one run can hold both."""
    if report["speed"].get("device_name", "cpu") == "cpu":
        return "structure", "structure_report.json"
    return "structure_gpu", "structure_report_gpu.json"


def log_structure_report(run_id: str, report: dict) -> None:
    """Metrics + ``structure_report.json`` (``structure_report_gpu.json`` for a GPU timing) of a structured output
    (see surgeon.speed.structure_report)."""
    client = _client()
    prefix, artifact = _report_names(report)
    sp, pa, fb = report["speed"], report["parameters"], report["file_bytes"]
    values = {"params_dense": pa["dense_total"], "params_materialized": pa["materialized_total"],
              "prunable_fraction": pa["prunable_fraction"],
              "file_mb_dense": fb["dense"] / 2**20, "file_mb_materialized": fb["materialized"] / 2**20,
              "ideal_speedup": sp["ideal_speedup"]}
    for work in ("prefill", "decode"):
        values[f"{work}_speedup"] = sp[f"{work}_speedup"]
        for who in ("dense", "pruned"):
            values[f"{work}_tokens_per_s_{who}"] = sp[who][f"{work}_tokens_per_s"]
        values[f"{work}_ms_per_token_pruned"] = sp["pruned"][f"{work}_ms_per_token"]
        values[f"{work}_ms_per_token_dense"] = sp["dense"][f"{work}_ms_per_token"]
    eq = report.get("equivalence", {})
    for k in ("float64_max_abs_diff", "fp32_max_abs_diff", "fp32_rounding_of_zeroed"):
        if k in eq:  # materialized vs zeroed logits (surgeon.materialized_export.logit_check)
            values[f"logits_{k}"] = eq[k]
    client.log_batch(run_id, metrics=_metrics({f"{prefix}/{k}": v for k, v in values.items()}, step=0))
    client.set_tag(run_id, f"{prefix}/device", sp.get("device_name", "cpu"))
    with tempfile.TemporaryDirectory(prefix="surgeon-mlflow-") as tmp:
        path = Path(tmp) / artifact
        path.write_text(json.dumps(report, indent=1, default=str))
        client.log_artifact(run_id, str(path))


def run_structure_report(run_id: str) -> dict | None:
    """The CPU structure report logged with a run (``structure_report.json``), or None when it has none."""
    client = _client()
    client.get_run(run_id)  # a clear error for an unknown run id
    with tempfile.TemporaryDirectory(prefix="surgeon-mlflow-") as tmp:
        try:
            path = client.download_artifacts(run_id, "structure_report.json", tmp)
        except Exception:  # noqa: BLE001 - mlflow raises several kinds for a missing artifact
            return None
        return json.loads(Path(path).read_text())


def attach_structure_report(run_id: str, report: dict) -> str:
    """Log a structure report measured elsewhere (e.g. ``surgeon report --kept`` on a GPU machine) with a run,
    after checking that it timed the run's structure: the per-layer sizes and the parameter counts must equal those
    of the run's own (CPU) report. Returns the metric prefix used."""
    from surgeon.errors import SurgeonError

    own = run_structure_report(run_id)
    if own is None:
        raise SurgeonError(f"run {run_id} has no structure_report.json to check the report against (a structured "
                           "or coupled run logs one)")
    mismatches = [k for k in ("dense_total", "materialized_total", "dense_prunable", "materialized_prunable")
                  if own["parameters"][k] != report["parameters"][k]]
    if own["layers"] != report["layers"] or mismatches:
        diff = [i for i, (a, b) in enumerate(zip(own["layers"], report["layers"])) if a != b]
        raise SurgeonError(f"the report timed a different structure than run {run_id}: parameter counts differ in "
                           f"{mismatches or 'none'}, layers differ at {diff[:10] or 'their number'}")
    log_structure_report(run_id, report)
    return _report_names(report)[0]


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]+", "_", name)


def log_zeroshot(run_id: str, step: int, result: dict | None, label: str) -> None:
    """Zero-shot metrics at ``step`` (0 = dense): ``zeroshot/<task>/<metric>`` (acc, acc_norm, their stderr,
    perplexity, ...), ``zeroshot/acc_avg`` and ``seconds/zeroshot``; lm-eval's full results JSON as the artifact
    ``zeroshot/<label>.json``."""
    if result is None:
        return
    values = {f"zeroshot/{_metric_name(task)}/{_metric_name(k)}": v for task, metrics in result["tasks"].items()
              for k, v in metrics.items() if k != "n"}
    values["zeroshot/acc_avg"] = result.get("average")
    values["seconds/zeroshot"] = result.get("seconds")
    client = _client()
    client.log_batch(run_id, metrics=_metrics({k: v for k, v in values.items() if v is not None}, step))
    src = Path(result.get("results_file") or "")
    if src.is_file():
        with tempfile.TemporaryDirectory(prefix="surgeon-mlflow-") as tmp:
            dest = Path(tmp) / f"{label}.json"
            dest.write_bytes(src.read_bytes())
            client.log_artifact(run_id, str(dest), "zeroshot")


def log_directory(run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
    """Log the files of ``directory`` (e.g. a sweep's comparison table and plot) to the run."""
    _client().log_artifacts(run_id, str(directory), artifact_path)


# ----------------------------------------------------------------------------------------------- registry

def registered_name(model_ref: str, explicit: str | None = None) -> str:
    """The registry name: ``explicit``, else named after the source model (folder/file name or Hub id tail)."""
    if explicit:
        return explicit
    tail = Path(model_ref.rstrip("/")).name
    tail = tail[: -len(".gguf")] if tail.lower().endswith(".gguf") else tail
    return tail.replace(":", "-")  # MLflow refuses ':' (and '/') in names, only at registration


WEIGHTS_TAG = "weights_sha256"  # model-version tag: the registry's identity of a version's weights
LINKED_RUNS_TAG = "linked_run_ids"  # model-version tag: later runs that produced the same weights
PIP_REQUIREMENTS = ("torch", "transformers", "safetensors", "tokenizers")


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over a model folder's weight files (``*.safetensors`` and their index: names and contents), the
    identity of a registered version: the same weights from another run or output folder give the same hash."""
    from surgeon.errors import SurgeonError
    from surgeon.utils import sha256_bytes, sha256_file

    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors"
                                                                   or p.name.endswith(".safetensors.index.json")))
    if not files:
        raise SurgeonError(f"no safetensors weights in {folder}: nothing to register")
    return sha256_bytes(json.dumps([[p.name, sha256_file(p)] for p in files]))


def version_with_weights(name: str, digest: str) -> str | None:
    """The earliest version of ``name`` whose weights hash is ``digest``, or None."""
    client = _client()
    found = client.search_model_versions(f"name = '{name}' and tags.{WEIGHTS_TAG} = '{digest}'")
    versions = sorted(int(mv.version) for mv in found)
    return str(versions[0]) if versions else None


def _save_flavour(model_dir: str | Path, dest: Path) -> None:
    """``model_dir`` saved as an MLflow transformers model (task text-generation, model and tokenizer) in ``dest``.

    The folder is loaded with transformers' own classes: a materialized model's classes are registered by
    importing ``surgeon.materialized_export``, never taken from code in the folder (trust_remote_code stays off).
    The copy carries no ``auto_map``, so no loader is pointed at code files either."""
    import mlflow.transformers
    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import surgeon.materialized_export  # noqa: F401 - registers the materialized model classes

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", local_files_only=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    if hasattr(model.config, "auto_map"):
        del model.config.auto_map
    from importlib.metadata import version

    # a params schema, so pyfunc's predict(..., params={"max_new_tokens": N}) is passed on, not dropped
    signature = infer_signature(["The capital of France is"], ["The capital of France is Paris."],
                                params={"max_new_tokens": 32, "do_sample": False, "temperature": 1.0})
    mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, str(dest), task="text-generation",
                                   torch_dtype=model.dtype, signature=signature,
                                   pip_requirements=[f"{p}=={version(p)}" for p in PIP_REQUIREMENTS])


def register_model(run_id: str, model_dir: str, name: str, tags: dict) -> dict:
    """Register ``model_dir`` as a version of ``name``, unless a version with the same weights exists.

    New weights: the folder is logged under the run's ``model/`` artifacts as an MLflow transformers model (so
    ``mlflow.transformers.load_model`` and ``mlflow.pyfunc.load_model`` load ``models:/NAME/V`` and
    ``models:/NAME@champion``) and registered with the ``weights_sha256`` tag. Weights registered before: that
    version is reused, nothing is copied, the run gets ``registered_model`` / ``registered_version`` /
    ``registration=reused`` tags and the version lists the run under ``linked_run_ids``.
    Returns ``{"version", "reused", "weights_sha256"}``.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    digest = weights_hash(model_dir)
    try:
        client.create_registered_model(name, description="LLM Surgeon pruned models of this source model; load a "
                                       "version with mlflow.transformers.load_model('models:/NAME/VERSION')")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version, reused = version_with_weights(name, digest), True
    if version is None:
        reused = False
        with tempfile.TemporaryDirectory(prefix="surgeon-mlflow-") as tmp:
            _save_flavour(model_dir, Path(tmp) / "model")
            client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        mv = client.create_model_version(name, source=source, run_id=run_id,
                                         tags={**{k: str(v) for k, v in tags.items() if v is not None},
                                               WEIGHTS_TAG: digest})
        version = str(mv.version)
        first = version_with_weights(name, digest)
        if first != version:  # another run registered the same weights at the same moment: keep the earliest
            client.delete_model_version(name, version)
            version = first
            reused = True
    if reused:
        mv = client.get_model_version(name, version)
        linked = [r for r in mv.tags.get(LINKED_RUNS_TAG, "").split(",") if r]
        if run_id != mv.run_id and run_id not in linked:
            # a tag value holds at most 5000 characters: the most recent runs are kept
            client.set_model_version_tag(name, version, LINKED_RUNS_TAG, ",".join([*linked, run_id])[-4900:]
                                         .lstrip(","))
    for k, v in {"registered_model": name, "registered_version": version,
                 "registration": "reused" if reused else "new", WEIGHTS_TAG: digest}.items():
        client.set_tag(run_id, k, v)
    return {"version": version, "reused": reused, "weights_sha256": digest}


def model_version(name: str, version: str) -> dict:
    """``{"name", "version", "run_id", "source", "tags", "aliases"}`` of a registered version."""
    from mlflow.exceptions import MlflowException

    from surgeon.errors import SurgeonError

    try:
        mv = _client().get_model_version(name, str(version))
    except MlflowException as exc:
        raise SurgeonError(f"model '{name}' version {version} not found in the registry at {tracking_uri()}: "
                           f"{exc.message}") from exc
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
            "tags": dict(mv.tags), "aliases": list(getattr(mv, "aliases", []) or [])}


def set_version_tags(name: str, version: str, tags: dict) -> None:
    client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def set_alias(name: str, version: str, alias: str = ALIAS) -> None:
    """Point ``alias`` at ``version`` (moving it from any other version)."""
    _client().set_registered_model_alias(name, alias, str(version))


def alias_version(name: str, alias: str = ALIAS) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


# ----------------------------------------------------------------------------------------------- clean-up

def _local_artifact_path(uri: str) -> Path | None:
    """The local folder of an artifact URI: ``file://`` paths, and ``mlflow-artifacts:/`` ones served from
    ``$SURGEON_HOME/mlartifacts`` (deployments/start_services.sh); None for any other store."""
    from urllib.parse import unquote

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    if parsed.scheme == "mlflow-artifacts":
        return surgeon_home().resolve() / "mlartifacts" / unquote(parsed.path).lstrip("/")
    return None


def model_artifacts() -> dict[str, list[dict]]:
    """The ``model/`` artifact folders of every run in the store (deleted runs included), split into ``needed``
    (the source of a registered version, or the run of one) and ``unneeded``; each ``{"path", "run_id",
    "experiment"}``. Only folders on this machine's disk are listed (``skipped`` counts the others)."""
    from mlflow.entities import ViewType

    client = _client()
    needed_runs, needed_paths = set(), set()
    for mv in client.search_model_versions(""):
        if mv.run_id:
            needed_runs.add(mv.run_id)
        path = _local_artifact_path(mv.source or "")
        if path is not None:
            needed_paths.add(path.resolve())
    out: dict[str, list] = {"needed": [], "unneeded": [], "skipped": []}
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for exp in experiments:
        token = None
        while True:
            runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000,
                                      page_token=token)
            for run in runs:
                root = _local_artifact_path(run.info.artifact_uri or "")
                if root is None:
                    out["skipped"].append({"run_id": run.info.run_id, "uri": run.info.artifact_uri})
                    continue
                folder = root / "model"
                if not folder.is_dir():
                    continue
                entry = {"path": str(folder), "run_id": run.info.run_id, "experiment": exp.name}
                keep = run.info.run_id in needed_runs or folder.resolve() in needed_paths
                out["needed" if keep else "unneeded"].append(entry)
            token = runs.token
            if not token:
                break
    return out
