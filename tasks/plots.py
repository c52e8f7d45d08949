"""Plots and tables for a run (matplotlib, Agg backend, files only): allocation heatmap, ppl vs size, CSV/markdown."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

__all__ = ["split_layer_name", "allocation_rows", "allocation_csv", "allocation_heatmap", "ppl_vs_size",
           "finetune_curves", "markdown_table", "write_comparison", "accuracy_vs_size", "allocation_heatmaps",
           "write_report"]

_BLOCK = re.compile(r"\.(\d+)\.")


def _save(fig, path: Path) -> None:
    """Render to memory, then write atomically (temp file + rename): a killed run leaves no half-written image."""
    from surgeon.utils import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write(path, buf.getvalue())


def _plain_log_ticks(ax) -> None:
    """Plain numbers (30, 40, 132.5) on a log-scale y axis instead of 3x10^1 or 1.325x10^2."""
    from matplotlib.ticker import FuncFormatter

    from matplotlib.ticker import LogLocator

    lo, hi = ax.get_ylim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 3.0
    subs = (1.5, 2, 3, 4, 5, 6, 7, 8, 9) if decades <= 1 else (1.5, 2, 3, 5, 7) if decades <= 2 else (2, 5)
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=subs))
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def split_layer_name(name: str) -> tuple[int, str]:
    """('model.layers.3.self_attn.q_proj') -> (3, 'q_proj')."""
    m = _BLOCK.search(name)
    return (int(m.group(1)) if m else -1), name.rsplit(".", 1)[-1]


def allocation_rows(shot_reports: list[dict]) -> list[dict]:
    """One row per pruned linear layer: block, type and its size (fraction kept) after every shot."""
    rows: dict[str, dict] = {}
    for rep in shot_reports:
        for name, size in rep["layer_sizes"].items():
            block, kind = split_layer_name(name)
            rows.setdefault(name, {"layer": name, "block": block, "type": kind})[f"size_shot_{rep['shot']}"] = size
    return list(rows.values())


def allocation_csv(shot_reports: list[dict]) -> str:
    rows = allocation_rows(shot_reports)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def allocation_heatmap(layer_sizes: dict[str, float], path: Path, title: str = "") -> Path:
    """Blocks (rows) x layer types (columns), colour = fraction of weights kept after the last shot."""
    plt = _pyplot()
    cells = {split_layer_name(n): s for n, s in layer_sizes.items()}
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))
    grid = [[cells.get((b, k), math.nan) for k in kinds] for b in blocks]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.22 * len(blocks)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    ax.set_title(title or "fraction of weights kept")
    if len(blocks) * len(kinds) <= 64:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
    fig.colorbar(im, ax=ax, label="size")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def ppl_vs_size(series: dict[str, list[tuple[float, float]]], path: Path, dense_ppl: float | None = None,
                title: str = "perplexity vs size") -> Path:
    """One line per series of (size, ppl) points; size 1.0 is the dense model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        pts = sorted(p for p in points if p[1] is not None and math.isfinite(p[1]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", linestyle="--", linewidth=1, label=f"dense {dense_ppl:.2f}")
    ax.set_xlabel("size (fraction of prunable weights kept)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def finetune_curves(reports: list[dict], path: Path) -> Path:
    """Fine-tuning loss per step, one line per shot, laid end to end (x = fine-tuning steps so far)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    start = 0
    for rep in reports:
        losses = rep["losses"]
        ax.plot(range(start + 1, start + len(losses) + 1), losses, label=f"after shot {rep.get('shot', '?')}")
        start += len(losses)
    ax.set_xlabel("fine-tuning step (all shots)")
    ax.set_ylabel("training loss (mean next-token NLL)")
    ax.grid(True, alpha=0.3)
    if len(reports) <= 12:
        ax.legend(fontsize=7)
    ax.set_title("mask-preserving fine-tuning")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_comparison(directory: Path, rows: list[dict], series: dict[str, list[tuple[float, float]]],
                     dense_ppl: float | None) -> Path:
    """A sweep's ``comparison.md``, ``comparison.csv`` and ``ppl_vs_size.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    from surgeon.utils import atomic_write

    atomic_write(directory / "comparison.md", markdown_table(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(directory / "comparison.csv", buf.getvalue())
    ppl_vs_size(series, directory / "ppl_vs_size.png", dense_ppl=dense_ppl, title="sweep: perplexity vs size")
    return directory


# ------------------------------------------------------------------------------------ sweep report (zero-shot)

def accuracy_vs_size(series: dict[str, list[tuple[float, float]]], path: Path, dense_acc: float | None = None,
                     title: str = "zero-shot accuracy vs size") -> Path:
    """One line per series of (size, mean zero-shot acc) points; size 1.0 is the dense model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, points) in enumerate(series.items()):
        pts = sorted(p for p in points if p[1] is not None and math.isfinite(p[1]))
        if pts:  # a marker per method: equal accuracies stay visible
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^v<>P"[i % 8], alpha=0.85, label=label)
    if dense_acc is not None:
        ax.axhline(dense_acc, color="grey", linestyle="--", linewidth=1, label=f"dense {dense_acc:.3f}")
    ax.set_xlabel("size (fraction of prunable weights kept)")
    ax.set_ylabel("mean zero-shot accuracy")
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def allocation_heatmaps(allocations: dict[str, dict[str, float]], path: Path,
                        title: str = "fraction of weights kept per layer") -> Path:
    """One panel per variant (blocks x layer types, colour = fraction kept), one shared colour scale."""
    plt = _pyplot()
    panels = {label: sizes for label, sizes in allocations.items() if sizes}
    if not panels:
        raise ValueError("no per-layer sizes to plot")
    grids = {}
    for label, sizes in panels.items():
        cells = {split_layer_name(n): s for n, s in sizes.items()}
        blocks = sorted({b for b, _ in cells})
        kinds = list(dict.fromkeys(k for _, k in cells))
        grids[label] = (blocks, kinds, [[cells.get((b, k), math.nan) for k in kinds] for b in blocks])
    nblocks = max(len(g[0]) for g in grids.values())
    nkinds = max(len(g[1]) for g in grids.values())
    fig, axes = plt.subplots(1, len(grids), squeeze=False, sharey=True, layout="constrained",
                             figsize=(1.4 + (0.3 * nkinds + 0.4) * len(grids), 2.0 + 0.2 * nblocks))
    im = None
    for ax, (label, (blocks, kinds, grid)) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_title(label, fontsize=8)
    axes[0][0].set_ylabel("block")
    fig.colorbar(im, ax=list(axes[0]), label="size (fraction kept)", aspect=40)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(size: float) -> str:
    return f"{100 * size:.4g}%"


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def write_report(directory: Path, *, title: str, variants: list[dict], dense_ppl: float | None,
                 dense_zeroshot: dict | None) -> Path:
    """A sweep's ``report.md`` (methods x sizes: perplexity and mean zero-shot accuracy; per-task accuracy), with
    ``acc_vs_size.png``, ``allocation_heatmaps.png`` and ``zeroshot.csv`` next to it (``ppl_vs_size.png`` comes from
    :func:`write_comparison`).

    ``variants``: ``{"label", "method", "structure", "target_size", "size", "ppl", "zeroshot" (result of the
    zero-shot task or None), "points" [(size, ppl, acc_avg) of the evaluated shots], "layer_sizes"}``.
    """
    from surgeon.utils import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    dense_acc = (dense_zeroshot or {}).get("average")
    has_zs = dense_zeroshot is not None or any(v.get("zeroshot") for v in variants)
    tasks = list(dict.fromkeys([*(dense_zeroshot or {}).get("tasks", {}),
                                *(t for v in variants for t in (v.get("zeroshot") or {}).get("tasks", {}))]))
    lines = [f"# {title}", ""]

    # at a glance: method x size pivots
    methods = list(dict.fromkeys(f"{v['method']} {v['structure']}" for v in variants))
    sizes = sorted({v["target_size"] for v in variants}, reverse=True)
    cell = {(f"{v['method']} {v['structure']}", v["target_size"]): v for v in variants}
    for what, key, digits in [("Perplexity", "ppl", 2), ("Mean zero-shot accuracy", "acc", 3)]:
        if key == "acc" and not has_zs:
            continue
        dense_v = dense_ppl if key == "ppl" else dense_acc
        lines += [f"## {what} (dense: {_fmt(dense_v, digits)})", "",
                  "| method | " + " | ".join(_pct(s) for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for m in methods:
            vals = []
            for s in sizes:
                v = cell.get((m, s))
                val = None if v is None else v["ppl"] if key == "ppl" else (v.get("zeroshot") or {}).get("average")
                vals.append(_fmt(val, digits))
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")

    # every variant, with per-task accuracy
    columns = ["variant", "size", "ppl", "ppl / dense", "acc avg", "acc change"] + \
        [f"{t} acc" for t in tasks]
    rows = [{"variant": "dense", "size": 1.0, "ppl": dense_ppl, "ppl / dense": 1.0 if dense_ppl else None,
             "acc avg": dense_acc, "acc change": 0.0 if dense_acc is not None else None,
             **{f"{t} acc": (dense_zeroshot or {}).get("tasks", {}).get(t, {}).get("acc") for t in tasks}}]
    for v in variants:
        zs = v.get("zeroshot") or {}
        acc = zs.get("average")
        rows.append({"variant": v["label"], "size": v["size"], "ppl": v["ppl"],
                     "ppl / dense": v["ppl"] / dense_ppl if v["ppl"] and dense_ppl else None,
                     "acc avg": acc, "acc change": acc - dense_acc if acc is not None and dense_acc is not None
                     else None, **{f"{t} acc": zs.get("tasks", {}).get(t, {}).get("acc") for t in tasks}})
    if not has_zs:
        columns = columns[:4]
    lines += ["## All variants", "", markdown_table(rows, columns)]
    if has_zs:
        n = {t: (dense_zeroshot or {}).get("tasks", {}).get(t, {}).get("n") for t in tasks}
        lines.append("Zero-shot: lm-eval `acc` per task (documents: " +
                     ", ".join(f"{t} {n[t] if n[t] is not None else '?'}" for t in tasks) +
                     "); `acc avg` is their unweighted mean.\n")

    # plots
    ppl_series: dict[str, list[tuple[float, float]]] = {}
    acc_series: dict[str, list[tuple[float, float]]] = {}
    for v in variants:
        label = f"{v['method']} {v['structure']}"
        ppl_series.setdefault(label, [(1.0, dense_ppl)] if dense_ppl else [])
        acc_series.setdefault(label, [(1.0, dense_acc)] if dense_acc is not None else [])
        for size, ppl, acc in v.get("points", []):
            if ppl is not None:
                ppl_series[label].append((size, ppl))
            if acc is not None:
                acc_series[label].append((size, acc))
    figures = []
    if (directory / "ppl_vs_size.png").is_file():
        figures.append(("Perplexity vs size", "ppl_vs_size.png"))
    if has_zs and any(len(p) > (1 if dense_acc is not None else 0) for p in acc_series.values()):
        accuracy_vs_size(acc_series, directory / "acc_vs_size.png", dense_acc=dense_acc,
                         title="sweep: mean zero-shot accuracy vs size")
        figures.append(("Mean zero-shot accuracy vs size", "acc_vs_size.png"))
    allocations = {v["label"]: v.get("layer_sizes") or {} for v in variants}
    if any(allocations.values()):
        allocation_heatmaps(allocations, directory / "allocation_heatmaps.png")
        figures.append(("Per-layer allocation (fraction kept after the last shot)", "allocation_heatmaps.png"))
    for caption, file in figures:
        lines += [f"## {caption}", "", f"![{caption}]({file})", ""]
    atomic_write(directory / "report.md", "\n".join(lines))

    if has_zs:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["variant", "size", "task", "metric", "value"])
        for label, size, zs in [("dense", 1.0, dense_zeroshot)] + [(v["label"], v["size"], v.get("zeroshot"))
                                                                     for v in variants]:
            for task, metrics in (zs or {}).get("tasks", {}).items():
                for metric, value in metrics.items():
                    writer.writerow([label, size, task, metric, value])
        atomic_write(directory / "zeroshot.csv", buf.getvalue())
    return directory
