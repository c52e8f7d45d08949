"""What a pruning run wrote: ``materialize`` (the really smaller model), ``report`` (its size and speed here or on a
GPU; attach a report measured elsewhere to a run) and ``verify`` (an output against its manifest)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgeon.errors import SurgeonError
from surgeon.utils import atomic_write

from .common import DebugOpt, JsonOpt, check_output_file, stage, write_json

__all__ = ["materialize_cmd", "report_cmd", "verify_cmd", "materialize_output", "print_materialize"]


def print_materialize(report: dict) -> None:
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


def materialize_output(output: str) -> dict:
    """``prune --materialize``: the exported folder -> OUTPUT-materialized (an earlier one is replaced)."""
    from surgeon.materialized_export import NothingToMaterialize, materialize_dir

    dest = Path(f"{str(output).rstrip('/')}-materialized")
    if dest.exists() and (dest / "materialize.json").exists():
        shutil.rmtree(dest)
    stage(f"materializing {output} -> {dest}")
    try:
        report = materialize_dir(output, dest)
    except NothingToMaterialize as exc:  # the pruning itself succeeded: say so, do not fail the command
        print(f"warning: not materialized: {exc}", file=sys.stderr)
        return {"skipped": str(exc)}
    print_materialize(report)
    return report


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
    from surgeon.materialized_export import materialize_dir

    json_out = check_output_file(json_out)
    report = materialize_dir(source, output, align=align, verify=verify)
    print_materialize(report)
    if json_out is not None:
        write_json(json_out, report)


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
        units = _kept_units(pruned)
        from surgeon.materialized_export import kept_to_json

        atomic_write(save_kept, json.dumps(kept_to_json(units)))
        print(f"wrote the kept units of {len(units)} layers to {save_kept}")
        if dense is None:
            return
    if dense is None or not dense.is_dir():
        raise SurgeonError(f"dense model folder not found: {dense} (--dense)")
    if kept is not None and not kept.is_file():
        raise SurgeonError(f"kept-units file not found: {kept}")
    from surgeon.speed import speed_summary, structure_report

    try:
        report = structure_report(str(pruned) if pruned else None, str(dense),
                                  kept=json.loads(kept.read_text()) if kept else None, threads=threads,
                                  device=device, decode_attention=decode_attention, log=stage)
    except ValueError as exc:
        raise SurgeonError(str(exc)) from exc
    sp, pa = report["speed"], report["parameters"]
    print(f"parameters {pa['dense_total']:,} -> {pa['materialized_total']:,} (prunable kept "
          f"{pa['prunable_fraction']:.4f}); {speed_summary(sp)}")
    if run_id is not None:
        from tasks import tracking

        tracking.log_structure_report(run_id, report)
        print(f"logged with run {run_id}")
    if json_out is not None:
        write_json(json_out, report)


def _kept_units(pruned: Path) -> list[dict]:
    """The kept FFN units / heads per layer of a pruned (zeroed) folder."""
    from transformers import AutoModelForCausalLM

    from surgeon_core.adapters import adapter_for
    from surgeon_core.materialize import find_kept

    model = AutoModelForCausalLM.from_pretrained(pruned, dtype="float32", local_files_only=True,
                                                 trust_remote_code=False)
    adapter = adapter_for(model)
    return find_kept(model, adapter, adapter.head_layout(model.config))


def verify_cmd(
    folder: Annotated[Path, typer.Argument(help="A `surgeon prune` output folder.")],
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check a pruned folder against its manifest.json: every file's sha256, no missing or extra files, the recipe
    (config hash, resolved recipe) and finite weights. Prints OK, or one line per difference and exits 1."""
    from surgeon.outputs import verify_dir

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
