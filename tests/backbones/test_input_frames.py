"""Input frames: each family's resize rule, checked against the processors' real pixels for odd sizes."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_assistant import backbones
from anomaly_assistant.backbones import FAMILIES
from anomaly_assistant.finding import Box

SIZES = [(641, 479), (97, 1200), (1200, 97), (333, 333), (57, 61)]


def marker_image(width: int, height: int, box: Box) -> Image.Image:
    """Black image with a white box: its position in the model input reveals the resize rule."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[round(box.y1): round(box.y2), round(box.x1): round(box.x2)] = 255
    return Image.fromarray(arr)


def model_input_pixels(family: str, processor, image: Image.Image) -> np.ndarray:
    """The (H, W) brightness of the image exactly as the model's vision tower receives it."""
    ip = processor.image_processor
    out = ip(images=[image], return_tensors="pt")
    if family == "qwen2_5_vl":
        _, gh, gw = out["image_grid_thw"][0].tolist()
        p, m = ip.patch_size, ip.merge_size
        x = out["pixel_values"].reshape(gh // m, gw // m, m, m, 3, ip.temporal_patch_size, p, p)
        x = x[:, :, :, :, :, 0]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)  # un-patchify to [3, H, W]
    elif family == "llava_onevision":
        x = out["pixel_values"][0, 0]  # the base view
    else:
        x = out["pixel_values"][0]
    return x.mean(0).numpy()


def found_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(pixels > 0)  # normalised black is negative, the white marker positive
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_frame_matches_processor_pixels(tiny_backbones, family, size):
    _, processor = tiny_backbones[family]
    module = backbones.get(family)
    w, h = size
    frame = module.input_frame(processor, (w, h))
    # a marker near the centre (inside LLaVA's centre crop for any aspect ratio)
    box = Box(
        round(0.42 * w),
        round(0.45 * h),
        round(0.42 * w) + max(8, w // 6),
        round(0.45 * h) + max(8, h // 6),
    )
    pixels = model_input_pixels(family, processor, marker_image(w, h, box))
    assert (pixels.shape[1], pixels.shape[0]) == frame.input_size  # exact size, including odd rounding
    expected = frame.to_input(box)
    got = found_box(pixels)
    # bicubic resampling blurs edges by up to ~2 input pixels beyond the scaled box (and rounds them)
    tol = 2.0 + max(frame.scale[0], frame.scale[1])
    assert np.allclose(got, expected.as_list(), atol=float(tol)), (got, expected)


def test_qwen_frame_follows_processor_budget(tiny_backbones):
    """A large image is shrunk into the pixel budget by smart-resize, keeping the aspect ratio within a
    patch."""
    _, processor = tiny_backbones["qwen2_5_vl"]
    frame = backbones.get("qwen2_5_vl").input_frame(processor, (641, 479))
    iw, ih = frame.input_size
    assert iw % 28 == 0 and ih % 28 == 0 and iw * ih <= processor.image_processor.size["longest_edge"]
    assert abs(iw / ih - 641 / 479) < 28 / min(iw, ih)


def test_llava_centre_crop_rounding(tiny_backbones):
    """97x1200 -> shortest edge 112: 112x1385, crop 112x112 at y = (1385 - 112) // 2 = 636."""
    _, processor = tiny_backbones["llava"]
    frame = backbones.get("llava").input_frame(processor, (97, 1200))
    assert frame.input_size == (112, 112)
    assert frame.offset == (0, 636)
    assert frame.scale == (Fraction(112, 97), Fraction(1385, 1200))  # int(112 * 1200 / 97) = 1385
    # pixels outside the crop map outside the input frame
    top = frame.to_input(Box(0, 0, 97, 100), clip=False)
    assert top.y2 < 0


@pytest.mark.parametrize("family", FAMILIES)
def test_box_round_trip(tiny_backbones, family):
    _, processor = tiny_backbones[family]
    module = backbones.get(family)
    for w, h in SIZES:
        frame = module.input_frame(processor, (w, h))
        iw, ih = frame.input_size
        model_box = Box(0.1 * iw, 0.2 * ih, 0.7 * iw, 0.9 * ih)
        back = frame.to_input(frame.to_original(model_box))
        assert np.allclose(back.as_list(), model_box.as_list(), atol=1e-9)
        original = frame.to_original(model_box)
        assert 0 <= original.x1 < original.x2 <= w and 0 <= original.y1 < original.y2 <= h


def test_llava_onevision_multi_image_frame(tiny_backbones):
    """Images of a multi-image sample are padded to a centred square before the resize."""
    _model, processor = tiny_backbones["llava_onevision"]
    w, h = 200, 80
    box = Box(90, 30, 130, 60)
    image = marker_image(w, h, box)
    out = processor.image_processor(images=[[image, image]], return_tensors="pt")
    pixels = out["pixel_values"][0, 0].mean(0).numpy()
    # the pad colour is the normalisation mean (zero after normalising): marker = positive, black = negative
    frame = backbones.get("llava_onevision").input_frame(processor, (w, h), multi_image=True)
    expected = frame.to_input(box)
    ys, xs = np.nonzero(pixels > 0.5)
    got = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.allclose(got, expected.as_list(), atol=2.5), (got, expected)
    assert torch.is_tensor(out["pixel_values"])
