"""Turning any path, PIL image, array or bytes a user hands us into an 8-bit RGB PIL image, with clear errors.

Images arrive as cameras make them; each kind is turned into the same 8-bit RGB picture a person would see:

- 16-bit (and 10/12/14-bit data stored in 16 bits) greyscale or RGB: scaled by the sensor's range, not
  clipped. The range is the smallest of 8, 10, 12, 14 or 16 bits that holds the image's maximum, so a 12-bit
  camera frame (values up to 4095) fills 0..255 like its 8-bit copy would, and a 16-bit PNG gives the same
  picture as the 8-bit PNG made from it (`value >> 8`);
- 32-bit integer and float images: floats in [0, 1] are scaled by 255, other ranges are stretched min..max;
- CMYK, palette, greyscale, YCbCr, LAB: converted to RGB; transparency (alpha, palette transparency) is
  composited onto black, the usual "don't care" background of machine-vision crops;
- EXIF orientation is applied for every format, so the picture stands the way the camera meant it.

A pixel-count limit (`DEFAULT_MAX_PIXELS`, override per call or with the environment variable
`ANOMALY_ASSISTANT_MAX_PIXELS`) refuses huge images from their header, before any pixel is decoded, instead of
allocating gigabytes; the expert works at a few hundred pixels per side anyway.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = str | Path | Image.Image | np.ndarray | bytes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; larger frames should be tiled or downscaled by the caller
MAX_PIXELS_ENV = "ANOMALY_ASSISTANT_MAX_PIXELS"
_SENSOR_BITS = (8, 10, 12, 14, 16)
# Mirror views by name: extra reference views (`ScreenerConfig.augment`) and the expert's score views
# (`ExpertConfig.score_views`).
FLIPS: dict[str, Image.Transpose] = {"hflip": Image.Transpose.FLIP_LEFT_RIGHT,
                                     "vflip": Image.Transpose.FLIP_TOP_BOTTOM}


class ImageError(ValueError):
    """An input could not be read as an image; the message names the input and the reason."""


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel-count limit in force: the argument, else the environment variable, else the default."""
    if max_pixels is not None:
        return int(max_pixels)
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        return int(raw)
    except ValueError:
        raise ImageError(f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels") from None


def _check_size(name: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.0f}; downscale or tile it, or raise the limit ({MAX_PIXELS_ENV})"
        )


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8 by the rules in the module docstring."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.floating):
        finite = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(finite.min(initial=0.0)), float(finite.max(initial=0.0))
        if low >= 0.0 and high <= 1.0:
            return (finite * 255.0).round().astype(np.uint8)
        span = max(high - low, 1e-12)
        return ((finite - low) / span * 255.0).round().astype(np.uint8)
    ints = values.astype(np.int64)
    low, high = int(ints.min(initial=0)), int(ints.max(initial=0))
    if low < 0 or high >= 1 << 16:  # signed or 32-bit data: stretch its own range
        span = max(high - low, 1)
        return ((ints - low) * 255 // span).astype(np.uint8)
    bits = next(b for b in _SENSOR_BITS if high < 1 << b)
    return (ints >> (bits - 8)).astype(np.uint8)


def _to_rgb(pil: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any PIL mode (see the module docstring)."""
    if pil.mode == "RGB":
        return pil
    if pil.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(pil))).convert("RGB")
    if pil.mode == "P" and "transparency" in pil.info:
        pil = pil.convert("RGBA")
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil.convert("RGB")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not {arr.shape}")
    pil = Image.fromarray(_to_uint8(arr))
    return pil


def load_image(image: ImageLike, max_pixels: int | None = None) -> Image.Image:
    """An 8-bit RGB PIL image, upright. Raises `ImageError` with the reason on bad input."""
    name = str(image) if isinstance(image, (str, Path)) else type(image).__name__
    limit = max_pixels_limit(max_pixels)
    try:
        if isinstance(image, Image.Image):
            _check_size(name, image.size, limit)
            pil = image
        elif isinstance(image, np.ndarray):
            if image.ndim >= 2:
                _check_size(name, (image.shape[1], image.shape[0]), limit)
            pil = _from_array(image)
        elif isinstance(image, (bytes, str, Path)):
            if isinstance(image, bytes):
                stream: Any = io.BytesIO(image)
            else:
                path = Path(image)
                if not path.is_file():
                    raise ImageError(f"{path}: no such file")
                if path.stat().st_size == 0:
                    raise ImageError(f"{path}: empty file")
                stream = path
            with Image.open(stream) as opened:
                _check_size(name, opened.size, limit)  # from the header: nothing decoded yet
                opened.load()
                pil = ImageOps.exif_transpose(opened)
        else:
            raise ImageError(f"cannot read an image from {type(image).__name__}")
        return _to_rgb(pil)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
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
