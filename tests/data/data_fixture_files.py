"""Helpers that write small image and mask files for the data-builder fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size=(64, 48), seed=0, mode="RGB", fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def write_mask(path: Path, size, rects, value=255) -> Path:
    """A mask with `value` inside each [x1, y1, x2, y2) rectangle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    for x1, y1, x2, y2 in rects:
        arr[y1:y2, x1:x2] = value
    Image.fromarray(arr).save(path)
    return path
