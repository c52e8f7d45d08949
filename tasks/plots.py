"""Plots and tables for a run (matplotlib, Agg backend, files only): allocation heatmap, ppl vs size, CSV/markdown."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

__all__ = ["split_layer_name", "allocation_rows", "allocation_csv", "allocation_heatmap", "ppl_vs_size",
           "finetune_curves", "markdown_table", "write_comparison"]

_BLOCK = re.compile(r"\.(\d+)\.")


def _save(fig, path: Path) -> None:
    """Render to memory, then write atomically (temp file + rename): a killed run leaves no half-written image."""
    from surgeon.utils import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write(path, buf.getvalue())


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
