"""Shared fixtures for eval tests: a small MVTec-layout category cut from a real texture (scikit-image's
brick)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


def make_mvtec(root: Path, category: str = "brick", n_train: int = 5, n_good: int = 4, n_bad: int = 4,
               size: int = 96) -> Path:
    """ROOT/CAT/{train/good, test/good, test/scratch, ground_truth/scratch/<stem>_mask.png}: crops of a real
    CC0 brick photo; defects are dark strokes whose masks are exactly the drawn pixels."""
    from skimage import data

    tex = data.brick()  # [512, 512] uint8
    rng = np.random.default_rng(0)
    cat = root / category
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (cat / sub).mkdir(parents=True, exist_ok=True)

    def crop(i: int) -> Image.Image:
        y, x = rng.integers(0, 512 - size, 2)
        return Image.fromarray(tex[y:y + size, x:x + size]).convert("RGB")

    for i in range(n_train):
        crop(i).save(cat / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        crop(i).save(cat / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        img = crop(i)
        mask = Image.new("L", img.size, 0)
        x0, y0 = rng.integers(10, size // 2, 2)
        pts = [(int(x0), int(y0)), (int(x0 + size // 3), int(y0 + size // 4 + i))]
        ImageDraw.Draw(img).line(pts, fill=(15, 15, 15), width=4 + i)
        ImageDraw.Draw(mask).line(pts, fill=255, width=4 + i)
        img.save(cat / "test/scratch" / f"{i:03d}.png")
        mask.save(cat / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("mvtec"))
