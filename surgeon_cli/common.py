"""What every command shares: option types, progress lines on stderr, early checks of paths, JSON output, the
Prefect/MLflow environment of the flow commands."""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm.auto import tqdm

from surgeon.errors import SurgeonError
from surgeon.utils import atomic_write
from tasks.plots import markdown_table

__all__ = ["DebugOpt", "JsonOpt", "ThreadsOpt", "DeviceOpt", "KEY_VALUE_ARGS", "stage", "check_output_file",
           "write_json", "tqdm_progress", "check_model_ref", "check_data_ref", "set_threads", "surgeon_version",
           "pipeline_env", "services_file", "running_services", "print_ui_hint", "markdown_table"]

JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads for torch (default: the physical cores this process may use; 1 avoids "
                      "oversubscription on a busy machine).", min=1)]

# context settings of the commands that take config fields as key=value arguments after their options
KEY_VALUE_ARGS = {"allow_extra_args": True, "ignore_unknown_options": False}


def stage(text: str) -> None:
    """A progress line on stderr (stdout carries only results)."""
    print(text, file=sys.stderr, flush=True)


class StageLog:
    """A logger-like sink for library progress messages (``log.info(fmt, *args)``): each one a :func:`stage` line."""

    def info(self, msg: str, *args) -> None:
        stage(msg % args if args else msg)


def check_output_file(path: Path | None) -> Path | None:
    """Validate an output file path early (before any work), without creating anything."""
    if path is None:
        return None
    path = path.expanduser()
    if path.is_dir():
        raise SurgeonError(f"output path is a folder, expected a file: {path}")
    existing = path.resolve().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SurgeonError(f"cannot create output file {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SurgeonError(f"cannot create output file {path}: {existing} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise SurgeonError(f"output file {path} is not writable")
    return path


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON atomically (a failed command leaves no half-written file)."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def tqdm_progress(desc: str, unit: str = "window"):
    """A ``progress(done, total)`` callback backed by a tqdm bar on stderr; call ``.close()`` when done."""
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


def check_model_ref(ref: str) -> None:
    """Cheap early check of a model reference: a local-looking path must exist (``random:ARCH`` models and Hub
    ids are resolved later)."""
    from surgeon.models import looks_like_path

    if ref.startswith(("hf:", "random:")):
        return
    path = Path(ref).expanduser()
    if not path.exists() and looks_like_path(ref):
        raise SurgeonError(f"model path not found: {path}")


def check_data_ref(ref: str) -> None:
    """Cheap early check of a data reference (before the model is loaded); ``random:NxL`` windows need none."""
    from surgeon.data import check_ref

    if not ref.startswith("random:"):
        check_ref(ref)


def set_threads(threads: int | None) -> None:
    """torch's thread count: ``threads``, else the physical cores this process may use."""
    from surgeon.utils import torch_threads

    torch_threads(threads)


def surgeon_version() -> str:
    try:
        return version("llm-surgeon")
    except PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def services_file() -> Path:
    """Where deployments/start_services.sh records its servers' addresses (``$SURGEON_RUN_DIR``, default
    ``$SURGEON_HOME/services``)."""
    home = Path(os.environ.get("SURGEON_HOME") or "~/.llm-surgeon").expanduser()
    return Path(os.environ.get("SURGEON_RUN_DIR") or home / "services").expanduser() / "services.json"


def _answers(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def running_services() -> dict | None:
    """The recorded services (``prefect_api_url``, ``mlflow_tracking_uri``) when their Prefect server answers."""
    path = services_file()
    try:
        svc = json.loads(path.read_text())
        api = svc["prefect_api_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return svc if _answers(f"{api.rstrip('/')}/health") else None


def pipeline_env() -> str:
    """Defaults for Prefect (set before it is first imported) and the MLflow tracking URI in use.

    A Prefect server is used when ``PREFECT_API_URL`` names one, else the one deployments/start_services.sh
    recorded if it answers (with its MLflow server, unless ``MLFLOW_TRACKING_URI`` is set); only without either
    does a flow start a temporary server over ``$SURGEON_HOME/prefect``."""
    home = Path(os.environ.get("SURGEON_HOME") or "~/.llm-surgeon").expanduser()
    if not os.environ.get("PREFECT_API_URL"):
        svc = running_services()
        if svc is not None:
            os.environ["PREFECT_API_URL"] = svc["prefect_api_url"]
            mlflow_uri = svc.get("mlflow_tracking_uri")
            if mlflow_uri and _answers(f"{mlflow_uri.rstrip('/')}/health"):
                os.environ.setdefault("MLFLOW_TRACKING_URI", mlflow_uri)
            stage(f"using the running services: Prefect {svc['prefect_api_url']} ({services_file().parent})")
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary Prefect server can take longer than Prefect's default 20 s to start on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-shot weight-loading bars are noise in logs
    from tasks.tracking import tracking_uri

    return tracking_uri()


def print_ui_hint() -> None:
    from tasks.tracking import ui_command

    if ui_command():
        print(f"  (serve the MLflow UI with: {ui_command()})")
