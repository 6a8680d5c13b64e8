"""Files shipped inside the package: a few small sample images so a fresh install can screen parts offline.

`samples/good/` holds reference normals, `samples/test/` images to inspect (one clean, some with a planted
defect). They are crops of scikit-image's bundled CC0 textures with defects drawn in by `make_samples.py`; no
dataset image ships with the package.
"""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent


def samples_dir() -> Path:
    """Folder of the bundled samples (`good/` references, `test/` images to inspect)."""
    return RESOURCES / "samples"


def sample_references() -> list[Path]:
    """The bundled reference normals, sorted."""
    return sorted((samples_dir() / "good").glob("*.png"))


def sample_images() -> list[Path]:
    """The bundled images to inspect, sorted."""
    return sorted((samples_dir() / "test").glob("*.png"))
