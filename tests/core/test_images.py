"""Images as cameras make them: bit depths, colour modes, orientation, and a pixel limit read from the
header."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from anomaly_assistant.images import MAX_PIXELS_ENV, ImageError, load_image
from anomaly_assistant.resources import sample_images, sample_references


def _grey_gradient(width=64, height=48) -> np.ndarray:
    return (np.add.outer(np.arange(height) * 3, np.arange(width) * 2) % 256).astype(np.uint8)


@pytest.mark.parametrize("bits", [16, 12, 10])
def test_deep_greyscale_is_scaled_by_its_sensor_range(tmp_path, bits):
    grey8 = _grey_gradient()
    deep = (grey8.astype(np.uint16) << (bits - 8)) | ((1 << (bits - 8)) - 1)  # full-range sensor values
    path = tmp_path / f"deep{bits}.png"
    Image.fromarray(deep).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (48, 64, 3)
    assert np.array_equal(loaded[..., 0], grey8)
    assert np.array_equal(np.asarray(load_image(deep)), loaded)  # the array path follows the same rule


def test_sixteen_bit_png_and_its_eight_bit_copy_screen_the_same(tmp_path):
    from anomaly_assistant.assistant import AnomalyAssistant

    query = np.asarray(Image.open(sample_images()[1]).convert("L"))
    deep_path, flat_path = tmp_path / "q16.png", tmp_path / "q8.png"
    Image.fromarray(query.astype(np.uint16) * 257).save(deep_path)
    Image.fromarray(((query.astype(np.uint16) * 257) >> 8).astype(np.uint8)).save(flat_path)
    refs = [Image.open(p).convert("L") for p in sample_references()]
    deep, flat = AnomalyAssistant.expert_only().screen([deep_path, flat_path], references=refs)
    assert deep.verdict == flat.verdict
    assert abs(deep.score - flat.score) <= 0.02
    assert np.abs(deep.anomaly_map - flat.anomaly_map).max() <= 0.02


def test_floats_and_wide_integers():
    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert np.asarray(load_image(unit))[..., 0].tolist()[2][3] == 255
    wide = np.array([[-5.0, 5.0]], dtype=np.float32)  # outside [0, 1]: stretched
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 255]
    big = np.array([[0, 1 << 20]], dtype=np.int32)
    assert np.asarray(load_image(big))[0, :, 0].tolist() == [0, 255]
    with pytest.raises(ImageError, match="must be"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_cmyk_palette_alpha_and_orientation(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    r, g, b = np.asarray(load_image(cmyk))[5, 10]
    assert r > 200 and g < 60 and b < 60

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.info["transparency"] = 1  # every pixel transparent -> black background
    assert np.asarray(load_image(palette)).max() == 0

    la = Image.merge("LA", [Image.new("L", (8, 8), 200), Image.new("L", (8, 8), 128)])
    assert 95 <= int(np.asarray(load_image(la))[0, 0, 0]) <= 105  # 200 at half opacity over black

    rotated = tmp_path / "exif.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (30, 10)).save(rotated, exif=exif)
    assert load_image(rotated).size == (10, 30)


def test_huge_png_is_refused_from_its_header_quickly_and_cheaply(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 megapixels, a few hundred kB on disk
    script = textwrap.dedent(f"""
        import resource, time
        from anomaly_assistant.images import ImageError, load_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            load_image({str(path)!r})
        except ImageError as exc:
            print("refused", round(time.perf_counter() - start, 3), exc)
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print("grown_mb", grown_mb)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout
    first, second = out.splitlines()
    assert first.startswith("refused"), out
    assert float(first.split()[1]) < 5.0
    assert "12000x12000 is 144 megapixels" in first and MAX_PIXELS_ENV in first
    assert float(second.split()[1]) < 100  # no full-image allocation (the decoded image would be 432 MB RGB)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path, max_pixels=5000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match="not a whole number"):
        load_image(path)


def test_bytes_and_bad_input(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (5, 7), 9).save(path)
    assert load_image(path.read_bytes()).size == (5, 7)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"GIF89a not really")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.png")
