"""The ``surgeon`` command line: the typer app and its console entry point.

Errors a user can cause print one line ``error: ...`` on stderr and exit with status 2 (no traceback unless
``--debug``); files (``--json``) are written atomically at the very end, so a failed command writes nothing.
"""

from __future__ import annotations

import sys
import traceback

import typer

from surgeon.errors import SurgeonError

from . import bench, gc, models, outputs, prune, registry
from .common import KEY_VALUE_ARGS, DebugOpt

__all__ = ["app", "main"]

app = typer.Typer(
    name="surgeon",
    help="LLM Surgeon: prune causal language models; fetch models and measure perplexity.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help paragraphs reflow; `code` and [brackets] print as written
)


@app.callback()
def _root(debug: DebugOpt = False) -> None:
    """LLM Surgeon command line (run `surgeon COMMAND --help`)."""


app.command("fetch-model")(models.fetch_model_cmd)
app.command("eval")(models.eval_cmd)
app.command("make-task")(models.make_task_cmd)
app.command("prune", cls=prune.ConfigCommand, context_settings=KEY_VALUE_ARGS,
            options_metavar="[OPTIONS] [KEY=VALUE]...")(prune.prune_cmd)
app.command("sweep", cls=prune.ConfigCommand, context_settings=KEY_VALUE_ARGS,
            options_metavar="[OPTIONS] [KEY=VALUE]...")(prune.sweep_cmd)
app.command("promote")(registry.promote_cmd)
app.command("gc")(gc.gc_cmd)
app.command("materialize")(outputs.materialize_cmd)
app.command("report")(outputs.report_cmd)
app.command("verify")(outputs.verify_cmd)
app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(
    bench.bench_cmd)

_USER_ERRORS = (SurgeonError, ValueError, OSError, FloatingPointError, KeyError)


def _kind(exc: BaseException) -> str | None:
    """Classify command-line framework exceptions by class name (typer vendors its own copy of click)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    for kind in ("Exit", "Abort", "ClickException"):
        if kind in names:
            return kind
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text[:500]


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


def run() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
