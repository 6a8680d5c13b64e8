"""A picture of a dataset: a grid of samples with ground-truth boxes and masks drawn (for `data inspect`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomaly_assistant.data_builders.records import Record, load_mask

BOX_COLOUR = (255, 40, 40)
MASK_COLOUR = np.array([255, 200, 0], np.float32)


def draw_record(rec: Record, tile: int = 224) -> Image.Image:
    """One tile: the image with its mask tinted, boxes outlined and a caption (label / defect / category)."""
    try:
        with Image.open(rec.image_path) as im:
            img = im.convert("RGB")
    except Exception as exc:  # a preview must not fail on one bad file
        img = Image.new("RGB", (tile, tile), (60, 0, 0))
        ImageDraw.Draw(img).text((4, 4), f"unreadable: {type(exc).__name__}", fill=(255, 255, 255))
        return img
    w, h = img.size
    if rec.gt_mask:
        mask, _ = load_mask(rec.gt_mask, (w, h))
        if mask is not None:
            arr = np.asarray(img, np.float32)
            arr[mask] = 0.55 * arr[mask] + 0.45 * MASK_COLOUR
            img = Image.fromarray(arr.astype(np.uint8))
    scale = tile / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (tile, tile + 16), (20, 20, 20))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for x1, y1, x2, y2 in rec.gt_boxes:
        draw.rectangle([x1 * scale, y1 * scale, x2 * scale - 1, y2 * scale - 1], outline=BOX_COLOUR, width=2)
    caption = f"{'NG' if rec.gt_label else 'OK'} {rec.defect_type or ''} | {rec.category}"[:40]
    draw.text((3, tile + 2), caption, fill=(255, 120, 120) if rec.gt_label else (150, 255, 150))
    return canvas


def render_grid(
    records: Sequence[Record], path: str | Path, n: int = 16, seed: int = 0, tile: int = 224, cols: int = 4
) -> Path:
    """Save a grid of `n` records (anomalous first, then normal, sampled by `seed`) as a PNG."""
    rng = np.random.default_rng(seed)
    bad = [r for r in records if r.gt_label]
    good = [r for r in records if not r.gt_label]
    n_bad = min(len(bad), max(n - min(len(good), n // 4), n // 2))
    pick = [bad[i] for i in rng.permutation(len(bad))[:n_bad]]
    pick += [good[i] for i in rng.permutation(len(good))[: n - len(pick)]]
    rows = max(1, -(-len(pick) // cols))
    grid = Image.new("RGB", (cols * tile, rows * (tile + 16)), (0, 0, 0))
    for i, rec in enumerate(pick):
        grid.paste(draw_record(rec, tile), ((i % cols) * tile, (i // cols) * (tile + 16)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
