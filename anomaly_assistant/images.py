"""Turning whatever a user hands us (path, PIL image, array, bytes) into an RGB PIL image, with clear errors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, np.ndarray, bytes]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An input could not be read as an image; the message names the input and the reason."""


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image (EXIF orientation applied). Raises `ImageError` with the reason on bad input."""
    name = str(image) if isinstance(image, (str, Path)) else type(image).__name__
    try:
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, np.ndarray):
            arr = image
            if arr.dtype != np.uint8:
                arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            pil = Image.fromarray(arr)
        elif isinstance(image, bytes):
            pil = Image.open(io.BytesIO(image))
            pil.load()
        elif isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise ImageError(f"{path}: no such file")
            if path.stat().st_size == 0:
                raise ImageError(f"{path}: empty file")
            with Image.open(path) as opened:
                opened.load()
                pil = opened.copy() if opened.format != "JPEG" else ImageOps.exif_transpose(opened)
        else:
            raise ImageError(f"cannot read an image from {type(image).__name__}")
        if pil.width < 1 or pil.height < 1:
            raise ImageError(f"{name}: image has no pixels")
        return pil.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as exc:
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc


def list_images(paths: Any) -> list[Path]:
    """Expand files and directories (non-recursive, sorted) into image paths."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        else:
            out.append(p)
    return out
