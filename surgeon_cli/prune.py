"""Pruning: ``prune`` (one recipe, the Prefect ``prune`` flow) and ``sweep`` (several variants of one recipe).

``prune`` has flags for the config fields people type most; every other field is ``key=value`` after the options
(its flat name, see :data:`surgeon.config.ALIASES`). ``surgeon prune --help`` lists, after the flags, every config
section with its fields and the method registry, generated from :data:`surgeon.config.SECTIONS` and
:data:`surgeon_core.methods.METHODS`/``OPTIONS``."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from surgeon.errors import SurgeonError

from .common import (DebugOpt, JsonOpt, StageLog, check_data_ref, check_model_ref, check_output_file,
                     markdown_table, pipeline_env, print_ui_hint, set_threads, stage, write_json)
from .outputs import materialize_output, print_materialize

__all__ = ["ConfigCommand", "prune_cmd", "sweep_cmd", "config_help", "MATERIALIZE_STRUCTURES"]

MATERIALIZE_STRUCTURES = ("structured", "coupled")  # whole units removed: the smaller model can be written


# ----------------------------------------------------------------------------------------- generated help

def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _choices(annotation) -> tuple:
    """The values a ``Literal[...]`` (optionally ``| None``) field accepts; () for other types."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return ()


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if typing.get_origin(annotation) not in (
        None, list) else [annotation]
    arg = args[0] if args else annotation
    if typing.get_origin(arg) is list:
        return f"list of {_type_name(typing.get_args(arg)[0])}s"
    return {bool: "true or false", int: "integer", float: "number", str: "string"}.get(arg, "value")


def _describe(description: str | None, annotation=None, default=None, choices: tuple = ()) -> str:
    """One line: the description (or the type when there is none), then the accepted values and the default in
    brackets as click prints them."""
    choices = choices or _choices(annotation)
    text = (description or ("" if choices else _type_name(annotation))).rstrip(".")
    notes = []
    if choices and not all(str(c) in text for c in choices):
        notes.append(f"choices: {', '.join(map(str, choices))}")
    if default is not None and default != [] and "default" not in text.lower():
        notes.append(f"default: {_yaml_value(default)}")
    return " ".join([text, f"[{'; '.join(notes)}]" if notes else ""]).strip()


def config_help() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(heading, paragraph, [(key, one-line description)]) for every config section and the method registry: the
    text that ``surgeon prune --help`` prints after the options."""
    from surgeon.config import PRIMARY, SECTIONS, PruneConfig
    from surgeon_core.methods import METHODS, OPTIONS

    model = PruneConfig.model_fields["model"]
    primary = ", ".join(f"{field} is {sec}.{field}" for field, sec in PRIMARY.items())
    out = [("Config fields",
            "Give them as key=value after the options: section.field, section_field, or the field alone where no "
            f"other section has it ({primary}); values are YAML (eval.at=[0.9,0.8]). A flag that names a field "
            "sets it, over key=value and the recipe (--config).",
            [("model", _describe(model.description))])]
    for name, section in SECTIONS.items():
        rows = [(f"{name}.{field}", _describe(info.description, info.annotation,
                                              info.get_default(call_default_factory=True)))
                for field, info in section.model_fields.items() if not (name == "method" and field in OPTIONS)]
        if name == "method":
            rows.append(("method.OPTION", "an option of the chosen method: see Method options"))
        doc = " ".join((section.__doc__ or "").split(". ")[0].split()).rstrip(".")  # the section's own docstring
        out.append((name, doc[:1].upper() + doc[1:] + "." if doc else "", rows))
    out.append(("Methods", "The values of method.name, and the options each method reads.",
                [row for key, spec in METHODS.items()
                 for row in ((key, spec.help), ("", f"options: {', '.join(spec.options) or 'none'}"))]))
    out.append(("Method options", "method.OPTION=VALUE; left unset, an option takes the method's default (for "
                "some, per structure).",
                [(f"method.{key}", _describe(opt.help, default=opt.default, choices=opt.choices))
                 for key, opt in OPTIONS.items()]))
    return out


class ConfigCommand(TyperCommand):
    """A command whose extra arguments are config fields (``key=value``): its help ends with the config sections
    and the method registry, and an unknown ``--flag`` naming a config field says how to give it."""

    def format_help(self, ctx: typer.Context, formatter) -> None:
        super().format_help(ctx, formatter)  # with Rich, printed already; what follows comes out after it
        for heading, text, rows in config_help():
            with formatter.section(heading):
                if text:
                    formatter.write_text(text)
                    formatter.write_paragraph()
                formatter.write_dl(rows, col_max=30)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            # typer's own copy of click raises it: known by name and attribute, as main() does
            option = getattr(exc, "option_name", None) if type(exc).__name__ == "NoSuchOption" else None
            if option:
                from surgeon.config import ALIASES

                where = ALIASES.get(option.lstrip("-").replace("-", "_"))
                if where is not None:
                    key = where[0] if isinstance(where, list) else option.lstrip("-").replace("-", "_")
                    exc.message = (f"No such option: {option}. Config fields without a flag go after the options "
                                   f"as key=value: {key}=VALUE")
                    exc.possibilities = []  # click's near matches are other flags, not this field
            raise


# ----------------------------------------------------------------------------------------- prune

def prune_cmd(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="YAML recipe (sections model, method, calibration, eval, compute, finetune, "
                               "output).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Model: local HF folder, .gguf file, Hub id, random:ARCH or a known name such as "
                              "smollm2-135m.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Pruning method (method.name), see Methods below.")] = None,
    structure: Annotated[Optional[str], typer.Option(
        help="unstructured, structured, coupled or N:M such as 2:4 (method.structure).")] = None,
    target_size: Annotated[Optional[float], typer.Option(
        help="Fraction of the prunable weights kept, 0.7 = 70% size (method.target_size).")] = None,
    shots: Annotated[Optional[int], typer.Option(help="Shots of the linear schedule (method.shots).")] = None,
    calibration: Annotated[Optional[str], typer.Option(
        help="Calibration text or .npy token windows (calibration.data).")] = None,
    nsamples: Annotated[Optional[int], typer.Option(help="Calibration windows (calibration.nsamples).")] = None,
    seqlen: Annotated[Optional[int], typer.Option(
        help="Tokens per calibration window (calibration.seqlen).")] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        help="Evaluation text or .npy token ids/windows; without it no perplexity is measured (eval.data).")] = None,
    eval_seqlen: Annotated[Optional[int], typer.Option(
        help="Evaluation window length; default: the calibration's (eval.seqlen).")] = None,
    eval_max_windows: Annotated[Optional[int], typer.Option(
        help="Evaluate on the first N windows only (eval.max_windows).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output model folder (output.path).")] = None,
    json_out: JsonOpt = None,
    device: Annotated[Optional[str], typer.Option(
        help="torch device: cpu, cuda or cuda:N (compute.device).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of the sampled Fisher's labels and of fine-tuning (method.seed; the calibration windows' draw "
             "is calibration.seed).")] = None,
    no_register: Annotated[bool, typer.Option(
        "--no-register", help="Do not register the pruned model in MLflow (output.register_model=false).")] = False,
    materialize: Annotated[bool, typer.Option(
        "--materialize", help="Also write the smaller model, all-zero FFN units and heads dropped, to "
                              "OUTPUT-materialized; structured or coupled only (output.materialize).")] = False,
    finetune_steps: Annotated[Optional[int], typer.Option(
        help="Mask-preserving fine-tuning steps after every shot; 0 = off (finetune.steps).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing OUTPUT that is not this recipe's own earlier output "
                            "(output.overwrite); an earlier output of the same recipe is always replaced.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Prune a model with LLM Surgeon or a baseline as the Prefect `prune` flow: cached, resumable shots,
    evaluation, export, MLflow tracking and registration (recipes: deployments/recipes/).

    The flags set the config fields people type most; every config field (listed after the options) can be given
    as key=value after the options, e.g. `surgeon prune --config R.yaml compute.dtype=bf16 damping_g=0.3
    finetune.lr=1e-4`."""
    from surgeon.config import GENERATED, load_recipe
    from surgeon.inputs import preflight
    from surgeon.launcher import check_nproc

    json_out = check_output_file(json_out)
    cfg = load_recipe(config, list(ctx.args), model=model, method=method, structure=structure,
                      target_size=target_size, shots=shots, calibration=calibration, nsamples=nsamples,
                      calibration_seqlen=seqlen, eval_data=eval_data, eval_seqlen=eval_seqlen,
                      eval_max_windows=eval_max_windows, output_path=output, device=device, method_seed=seed,
                      register_model=False if no_register else None, finetune_steps=finetune_steps,
                      materialize=True if materialize else None, overwrite=True if overwrite else None)
    m = cfg.method
    if cfg.output.materialize and m.structure not in MATERIALIZE_STRUCTURES:
        raise SurgeonError(f"--materialize needs --structure structured or coupled (whole units removed); "
                           f"{m.structure} zeros stay inside dense matrices")
    if json_out is not None and cfg.output.path and json_out.resolve().is_relative_to(
            Path(cfg.output.path).expanduser().resolve()):
        raise SurgeonError(f"--json {json_out} is inside the output folder {cfg.output.path}, which is replaced "
                           "as a whole; write it elsewhere")
    check_model_ref(cfg.model)
    for ref in (cfg.calibration.data, cfg.eval.data, cfg.finetune.data):
        if ref is not None and ref != GENERATED:
            check_data_ref(ref)
    check_nproc(cfg)
    set_threads(cfg.compute.threads)
    stage("checking the output folder, model and data")
    preflight(cfg, StageLog())  # every bad input fails here, in one line, before a flow run starts
    uri = pipeline_env()
    stage(f"pruning {cfg.model}: {m.name}, {m.structure}, target size {cfg.final_target:g}, {len(cfg.plan())} "
          f"shot(s) (Prefect flow 'prune'; MLflow {uri})")
    from flows.prune import prune_flow  # after pipeline_env(): Prefect reads its settings when first imported

    result = prune_flow(cfg)
    secs = [r["seconds"] for r in result["rows"] if not r["cached"]]
    out = {"ppl": result["ppl"], "dense_ppl": result["dense_ppl"], "target_size": cfg.final_target,
           "achieved_size": result["achieved_size"], "seconds": result["seconds"],
           "seconds_per_shot": sum(secs) / len(secs) if secs else 0.0, "output": result["output"],
           "config": cfg.recipe(), "config_hash": result["config_hash"], "shots": result["rows"],
           "cached_shots": result["cached_shots"], "source_model_hash": result["source_model_hash"],
           "calibration_id": result["calibration_id"], "mlflow_run_id": result["run_id"],
           "mlflow_run": result["run_url"], "model_name": result["model_name"],
           "registered_version": result["registered_version"], "registration": result.get("registration"),
           "dense_zeroshot": result.get("dense_zeroshot"),
           "zeroshot": result.get("zeroshot")}
    if cfg.output.materialize:  # the flow materializes (and registers the smaller model); else here
        mat = result.get("materialized")
        if mat is None:
            mat = materialize_output(result["output"])
        elif "skipped" in mat:
            print(f"warning: not materialized: {mat['skipped']}", file=sys.stderr)
        else:
            print_materialize(mat)
        out["materialized"] = mat
    _print_prune_result(out)
    if json_out is not None:
        write_json(json_out, out)


def _print_prune_result(out: dict) -> None:
    from tasks.reporting import zeroshot_rows

    dense = [{"shot": 0, "target_size": 1.0, "size": 1.0, "ppl": out["dense_ppl"]}] if out["dense_ppl"] else []
    print(markdown_table(dense + out["shots"], ["shot", "target_size", "size", "ppl", "seconds", "cached"]), end="")
    if out["ppl"] is not None:
        dense_note = f" (dense {out['dense_ppl']:.3f})" if out["dense_ppl"] else ""
        print(f"ppl {out['ppl']:.3f}{dense_note} at size {out['achieved_size']:.4f}")
    else:
        print(f"size {out['achieved_size']:.4f} (no eval.data given)")
    if out.get("zeroshot") or out.get("dense_zeroshot"):
        print(markdown_table(zeroshot_rows(out.get("dense_zeroshot"), out.get("zeroshot"))), end="")
    if out["cached_shots"]:
        print(f"shots from the cache: {', '.join(map(str, out['cached_shots']))}")
    print(f"wrote {out['output']}")
    print(f"MLflow run {out['mlflow_run']}")
    print_ui_hint()
    if out["registered_version"]:
        how = "same weights as" if out.get("registration") == "reused" else "registered"
        print(f"{how} {out['model_name']} version {out['registered_version']} (promote: surgeon promote "
              f"--model-name {out['model_name']} --version {out['registered_version']}; load: "
              f"mlflow.transformers.load_model('models:/{out['model_name']}/{out['registered_version']}'))")


# ----------------------------------------------------------------------------------------- sweep

def sweep_cmd(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML recipe with a 'sweep:' list of variants; "
                                         "key=value arguments after the options override the base recipe.")],
    dask: Annotated[Optional[str], typer.Option(
        "--dask", help="Fan the runs out over Dask workers (prefect-dask): 'local' or 'local:N' (a temporary local "
                       "cluster of N worker processes; default one per GPU for a CUDA recipe, else 2) or a "
                       "scheduler address tcp://HOST:8786. Default: one run after the other.")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run several methods / structures / targets from one recipe (the Prefect `sweep` flow) and compare them."""
    json_out = check_output_file(json_out)
    uri = pipeline_env()
    from flows.sweep import dask_task_runner, run_sweep, sweep_configs  # after pipeline_env(), as in prune

    _, configs = sweep_configs(str(config), list(ctx.args))  # validate every variant before anything runs
    if dask is not None:
        dask_task_runner(dask, device=configs[0].compute.device)  # a malformed --dask: one line before any run
    where = f"; Dask {dask}" if dask else ""
    stage(f"sweep of {len(configs)} variants (Prefect flow 'sweep'{where}; MLflow {uri})")
    result = run_sweep(str(config), list(ctx.args), dask=dask)
    print(markdown_table(result["rows"]), end="")
    print(f"comparison: {result['comparison_dir']}")
    print(f"MLflow run {result['run_url']}")
    print_ui_hint()
    if json_out is not None:
        write_json(json_out, {k: v for k, v in result.items() if k != "results"})

