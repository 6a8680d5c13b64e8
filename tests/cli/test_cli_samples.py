"""The bundled samples are small, exactly what make_samples.py writes, and not copied from any dataset."""

from __future__ import annotations

import numpy as np
from PIL import Image

from anomaly_assistant.resources import make_samples, sample_images, sample_references, samples_dir


def test_samples_are_small_and_complete():
    files = sorted(samples_dir().rglob("*.png"))
    assert [p.name for p in sample_references()] == ["good_1.png", "good_2.png", "good_3.png"]
    assert [p.name for p in sample_images()] == ["clean.png", "scratch.png", "stain.png"]
    assert len(files) == 6
    assert all(p.stat().st_size <= 40 * 1024 for p in files)
    assert sum(p.stat().st_size for p in files) <= 200 * 1024


def test_shipped_samples_match_the_generator(tmp_path):
    written = make_samples.make_samples(tmp_path)
    assert len(written) == 6
    for path in written:
        shipped = samples_dir() / path.relative_to(tmp_path)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped))), shipped


def test_planted_defects_change_only_their_region():
    tex = make_samples._texture()
    for name, draw in make_samples.DEFECTS.items():
        clean = make_samples._crop(tex, make_samples.TEST[name])
        if draw is None:
            continue
        diff = np.abs(np.asarray(draw(clean), int) - np.asarray(clean, int)) > 10  # [H, W]
        ys, xs = np.nonzero(diff)
        assert diff.mean() > 0.01  # visible
        # local, not a global shift
        assert xs.min() > 20 and xs.max() < 140 and ys.min() > 20 and ys.max() < 140
