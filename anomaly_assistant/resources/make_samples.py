"""Regenerate the bundled sample images: `python -m anomaly_assistant.resources.make_samples`.

Source: scikit-image's bundled CC0 `brick` texture (no dataset image ever ships). Six crops from disjoint
parts of the 512² texture: three become reference normals (`good/`), three stay clean or get a defect drawn in
(`test/`):
- `test/clean.png`: an untouched crop (expected: normal)
- `test/scratch.png`: a dark diagonal scratch, 5 px wide (expected: anomalous)
- `test/stain.png`: a dark soft-edged stain, 36 px across (expected: anomalous)
Grayscale PNGs of SIZE² pixels keep every file well under 40 KB. Deterministic (fixed crops, no randomness).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 160
# (row, col) of each crop's top-left corner in the 512² texture; disjoint so no test crop is a reference.
GOOD = {"good_1.png": (0, 0), "good_2.png": (0, 176), "good_3.png": (176, 0)}
TEST = {"clean.png": (176, 176), "scratch.png": (352, 0), "stain.png": (352, 176)}


def _texture() -> np.ndarray:
    from skimage import data

    return data.brick()  # (512, 512) uint8, CC0


def _crop(tex: np.ndarray, at: tuple[int, int]) -> Image.Image:
    r, c = at
    return Image.fromarray(tex[r:r + SIZE, c:c + SIZE])


def draw_scratch(im: Image.Image) -> Image.Image:
    """A thin dark line across the middle, slightly blurred like a real scratch's edge."""
    mask = Image.new("L", im.size, 0)
    w, h = im.size
    ImageDraw.Draw(mask).line([(0.25 * w, 0.3 * h), (0.75 * w, 0.65 * h)], fill=255, width=5)
    mask = mask.filter(ImageFilter.GaussianBlur(0.8))
    dark = Image.new("L", im.size, 15)
    return Image.composite(dark, im, mask)


def draw_stain(im: Image.Image) -> Image.Image:
    """A dark blob with a soft edge (a stain or a burn mark)."""
    mask = Image.new("L", im.size, 0)
    w, h = im.size
    ImageDraw.Draw(mask).ellipse([0.5 * w - 18, 0.55 * h - 18, 0.5 * w + 18, 0.55 * h + 18], fill=230)
    mask = mask.filter(ImageFilter.GaussianBlur(2.5))
    dark = Image.new("L", im.size, 35)
    return Image.composite(dark, im, mask)


DEFECTS = {"clean.png": None, "scratch.png": draw_scratch, "stain.png": draw_stain}


def make_samples(out: Path) -> list[Path]:
    """Write good/ and test/ under `out`; returns the written paths."""
    tex = _texture()
    written = []
    for sub, crops in (("good", GOOD), ("test", TEST)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for name, at in crops.items():
            im = _crop(tex, at)
            draw = DEFECTS.get(name) if sub == "test" else None
            if draw is not None:
                im = draw(im)
            path = out / sub / name
            im.save(path, optimize=True)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Write the sample images (to the package's `samples/` unless `--out` says otherwise) and list them.

    Run after changing the crops or defects above, then commit the regenerated PNGs.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "samples")
    args = parser.parse_args(argv)
    for path in make_samples(args.out):
        print(f"{path}  {path.stat().st_size / 1024:.1f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
