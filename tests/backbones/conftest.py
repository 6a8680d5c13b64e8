"""Session-scoped tiny backbones (built once, in code) and a few real-looking test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly_assistant import tiny
from anomaly_assistant.backbones import FAMILIES


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB image (blurred noise), so resizing keeps it textured."""
    rng = np.random.RandomState(seed)
    small = (rng.rand(max(2, height // 8), max(2, width // 8), 3) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@pytest.fixture(scope="session")
def tiny_backbones() -> dict:
    """family -> (model, processor), built once for the whole session."""
    return {family: tiny.build_tiny(family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def saved_backbones(tmp_path_factory) -> dict:
    """family -> directory holding a tiny model + processor written by `tiny.save_tiny` (same seed)."""
    return {
        family: tiny.save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)
        for family in FAMILIES
    }
