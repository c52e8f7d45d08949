"""The model registry: ``promote`` (the Prefect ``promote`` flow) moves the alias ``champion`` to a registered
version only if its perplexity passes the gate."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tasks.tracking import ALIAS

from .common import DebugOpt, pipeline_env

__all__ = ["promote_cmd"]


def promote_cmd(
    model_name: Annotated[str, typer.Option("--model-name", help="Registered model name.")],
    version: Annotated[str, typer.Option("--version", help="Model version to promote.")],
    max_ppl_ratio: Annotated[Optional[float], typer.Option(
        help="Gate: pruned ppl <= RATIO x dense ppl (default: output.promote_max_ppl_ratio of the recipe that "
             "made the version).")] = None,
    alias: Annotated[str, typer.Option(help="Registry alias to move.")] = ALIAS,
    debug: DebugOpt = False,
) -> None:
    """Move the registry alias (champion) to a model version if it passes the perplexity gate (exit 1 if not)."""
    pipeline_env()
    # Prefect and MLflow are imported after pipeline_env() has set their environment
    from flows.promote import PromotionRefused, promote_flow
    from tasks.tracking import model_version

    model_version(model_name, version)  # a missing version: one line, before a flow run starts
    state = promote_flow(model_name, version, max_ppl_ratio=max_ppl_ratio, alias=alias, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, PromotionRefused):
        result = result.result
    elif isinstance(result, BaseException):
        raise result
    if result["passed"]:
        print(f"promoted {model_name} version {version} to '{alias}': {result['reason']}")
        return
    print(f"not promoted: {result['reason']}; '{alias}' stays at "
          f"{'version ' + result['previous'] if result['previous'] else 'no version'}", file=sys.stderr)
    raise typer.Exit(1)
