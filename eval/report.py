"""Human-readable reports next to every result JSON: Markdown + HTML with matplotlib PNGs.

`out.json` gets `out.md`, `out.html` and `out_figures/*.png` beside it. A report is readable on its own:
every number of the JSON that matters is in a table, and the figures show ROC curves, per-class bars and
a grid of example heatmaps with ground-truth (green) and predicted (red) boxes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_assistant.localize import DEFAULT_THRESHOLD


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: floats rounded, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def report_paths(out_json: str | Path) -> tuple[Path, Path, Path]:
    """(markdown, html, figure folder) for a result JSON path."""
    out = Path(out_json)
    stem = out.with_suffix("")
    return stem.with_suffix(".md"), stem.with_suffix(".html"), Path(f"{stem}_figures")


@dataclass
class Report:
    """An ordered list of blocks rendered to Markdown and HTML with the same content."""

    title: str
    out_json: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_json = Path(self.out_json)
        self.md_path, self.html_path, self.fig_dir = report_paths(self.out_json)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        if rows:
            cols = list(columns or rows[0].keys())
            self.blocks.append(("table", (cols, [[fmt(r.get(c)) for c in cols] for r in rows])))

    def figure_path(self, name: str) -> Path:
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        return self.fig_dir / name

    def figure(self, path: Path | None, caption: str) -> None:
        if path is not None and Path(path).is_file():
            self.blocks.append(("img", (Path(path), caption)))

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"Results: `{self.out_json.name}`", ""]
        for kind, data in self.blocks:
            if kind == "h2":
                lines += [f"## {data}", ""]
            elif kind == "p":
                lines += [data, ""]
            elif kind == "table":
                cols, rows = data
                lines.append("| " + " | ".join(cols) + " |")
                lines.append("|" + "|".join("---" for _ in cols) + "|")
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                lines.append("")
            elif kind == "img":
                path, caption = data
                rel = path.relative_to(self.md_path.parent).as_posix()
                lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
        return "\n".join(lines)

    def to_html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>", f"<p>Results: <code>{e(self.out_json.name)}</code></p>"]
        for kind, data in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{e(data)}</h2>")
            elif kind == "p":
                body.append(f"<p>{e(data)}</p>")
            elif kind == "table":
                cols, rows = data
                head = "".join(f"<th>{e(c)}</th>" for c in cols)
                trs = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                path, caption = data
                rel = path.relative_to(self.html_path.parent).as_posix()
                body.append(f'<figure><img src="{e(rel)}" alt="{e(caption)}">'
                            f'<figcaption>{e(caption)}</figcaption></figure>')
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
                 "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{color:#555;font-style:italic}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")

    def save(self) -> tuple[Path, Path]:
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        self.md_path.write_text(self.to_markdown(), encoding="utf-8")
        self.html_path.write_text(self.to_html(), encoding="utf-8")
        return self.md_path, self.html_path


# ------------------------------------------------------------------------------------------ figures


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path, title: str = "ROC"
) -> Path | None:
    """One ROC curve per entry {name: (fpr, tpr, auc)}."""
    curves = {k: v for k, v in curves.items() if v is not None}
    if not curves:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUROC {fmt(auc)})")
    ax.plot([0, 1], [0, 1], ls="--", c="#999", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curve(x: np.ndarray, y: np.ndarray, path: Path, xlabel: str, ylabel: str, title: str,
               x_max: float | None = None) -> Path:
    """A single curve (e.g. PRO vs FPR), shaded up to `x_max`."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    ax.plot(x, y, lw=1.6)
    if x_max is not None:
        keep = x <= x_max
        ax.fill_between(x[keep], y[keep], alpha=0.2)
        ax.axvline(x_max, ls="--", c="#999", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.01))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(per_class: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], path: Path,
              title: str = "per class", ylim: tuple[float, float] | None = (0, 1)) -> Path | None:
    """Grouped bars: one group per class, one bar per metric."""
    classes = list(per_class)
    if not classes:
        return None
    plt = _mpl()
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(classes) * max(1, len(metrics)) * 0.5 + 2), 3.8),
                           dpi=110)
    x = np.arange(len(classes))
    for j, m in enumerate(metrics):
        vals = [per_class[c].get(m) for c in classes]
        vals = [float(v) if v is not None else np.nan for v in vals]
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, vals, width, label=m)
    ax.set_xticks(x, classes, rotation=30 if len(classes) > 4 else 0,
                  ha="right" if len(classes) > 4 else "center")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, pad=18)
    ax.legend(fontsize=7, ncol=min(5, len(metrics)), loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_boxes(ax, boxes: Sequence[Sequence[float]], color: str) -> None:
    from matplotlib.patches import Rectangle

    for b in boxes or []:
        x1, y1, x2, y2 = (float(v) for v in b[:4])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.4))


def plot_heatmap_grid(examples: Sequence[Mapping[str, Any]], path: Path, cols: int = 4,
                      threshold: float = DEFAULT_THRESHOLD) -> Path | None:
    """Each example side by side: the image with its ground truth, and the finding as the inspector sees it.

    Left: GT boxes (green) / GT mask contour; right: `anomaly_assistant.overlay.render_overlay`, with
    `threshold` (the run's) marked on its colour bar. Keys: image_path, anomaly_map (H, W) or None, gt_mask
    (H, W) or None, gt_boxes, pred_boxes, score, verdict, title.
    """
    examples = list(examples)
    if not examples:
        return None
    from PIL import Image

    from anomaly_assistant.finding import Box, Finding
    from anomaly_assistant.overlay import render_overlay

    plt = _mpl()
    cols = max(1, min(cols, len(examples)))
    rows = math.ceil(len(examples) / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.4 * 2 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ex in enumerate(examples):
        r, c = divmod(i, cols)
        ax_img, ax_map = axes[r, 2 * c], axes[r, 2 * c + 1]
        with Image.open(ex["image_path"]) as im:
            image = im.convert("RGB")
        img = np.asarray(image)
        ax_img.imshow(img)
        mask = ex.get("gt_mask")
        if mask is not None and np.asarray(mask).any() and np.asarray(mask).shape == img.shape[:2]:
            ax_img.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
        _draw_boxes(ax_img, ex.get("gt_boxes") or [], "lime")
        ax_img.set_title(ex.get("title", ""), fontsize=7)
        finding = Finding(verdict=ex.get("verdict", "normal"), score=ex.get("score"),
                          boxes=[Box(*map(float, b[:4])) for b in ex.get("pred_boxes") or []],
                          anomaly_map=ex.get("anomaly_map"), image_size=image.size)
        ax_map.imshow(np.asarray(render_overlay(image, finding, threshold)))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
