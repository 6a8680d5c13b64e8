"""The one region->box rule and the threshold: specks, touching regions, diagonal cracks, merge gaps, NaNs."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_assistant.localize import (
    BOX_CORE,
    DEFAULT_THRESHOLD,
    boxes_for_verdict,
    boxes_from_map,
    check_threshold,
    is_anomalous,
)


def _coords(boxes) -> list[list[float]]:
    return [b.as_list() for b in boxes]


def test_boxes_are_half_open_in_the_map_frame():
    mask = np.zeros((40, 60), bool)
    mask[2:5, 3:9] = True
    (box,) = boxes_from_map(mask)
    assert box.as_list() == [3.0, 2.0, 9.0, 5.0] and box.area == mask.sum()


def test_specks_are_dropped_by_the_larger_of_absolute_and_relative_area():
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True  # the defect
    mask[50, 50] = mask[70, 5] = True  # single-pixel specks
    mask[90, 90:93] = True  # 3 px < min_area 4 (1e-4 of the image is 1 px)
    assert _coords(boxes_from_map(mask)) == [[10.0, 10.0, 20.0, 20.0]]
    assert len(boxes_from_map(mask, min_area=1)) == 4
    big = np.zeros((1000, 1000), bool)
    big[100:200, 100:200] = True
    big[500:505, 500:510] = True  # 50 px: above 4 px but below 1e-4 of a megapixel (100 px)
    assert _coords(boxes_from_map(big)) == [[100.0, 100.0, 200.0, 200.0]]
    assert len(boxes_from_map(big, min_area_frac=0.0)) == 2


def test_only_specks_still_give_the_strongest_one():
    amap = np.zeros((50, 50), np.float32)
    amap[5, 5], amap[30, 40] = 0.7, 0.9
    (box,) = boxes_from_map(amap, 0.5)
    assert box.as_list() == [40.0, 30.0, 41.0, 31.0] and box.score == pytest.approx(0.9)
    mask = np.zeros((50, 50), bool)
    mask[5, 5] = True
    mask[20:22, 20] = True  # equal peaks in a mask: the larger speck
    assert _coords(boxes_from_map(mask)) == [[20.0, 20.0, 21.0, 22.0]]


def test_a_speck_inside_a_stronger_maps_box_is_dropped_but_a_masks_inner_region_stays():
    amap = np.zeros((60, 60), np.float32)
    amap[10:40, 10:12] = amap[10:40, 38:40] = amap[10:12, 10:40] = amap[38:40, 10:40] = 0.9  # a ring
    amap[24:27, 24:27] = 0.6  # a speck inside the ring's box, not connected to it
    amap[50:53, 50:53] = 0.6  # a speck outside it
    assert _coords(boxes_from_map(amap, 0.5)) == [[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 53.0, 53.0]]
    assert len(boxes_from_map(amap, 0.5, max_boxes=2)) == 2  # the dropped speck does not use up a place
    assert boxes_from_map(amap, 0.5, max_boxes=0) == []
    assert len(boxes_from_map(amap >= 0.5)) == 3  # a mask's regions are the truth: all stay


def test_regions_touching_at_a_corner_are_one_region_a_one_pixel_gap_is_not():
    mask = np.zeros((30, 30), bool)
    mask[2:6, 2:6] = mask[6:10, 6:10] = True  # corner to corner
    assert _coords(boxes_from_map(mask)) == [[2.0, 2.0, 10.0, 10.0]]
    mask[:] = False
    mask[2:6, 2:6] = mask[2:6, 7:11] = True  # one background column between them
    assert sorted(_coords(boxes_from_map(mask))) == [[2.0, 2.0, 6.0, 6.0], [7.0, 2.0, 11.0, 6.0]]


def test_a_thin_diagonal_crack_is_one_box():
    mask = np.zeros((64, 64), bool)
    idx = np.arange(10, 50)
    mask[idx, idx] = True  # 1 px wide: 4-connectivity would make 40 one-pixel specks and drop them all
    assert _coords(boxes_from_map(mask)) == [[10.0, 10.0, 50.0, 50.0]]
    mask[idx, 59 - idx] = True  # a second crack crossing the first: still one defect
    assert _coords(boxes_from_map(mask)) == [[10.0, 10.0, 50.0, 50.0]]


def test_merge_gap_joins_regions_up_to_that_many_background_pixels_apart():
    mask = np.zeros((40, 40), bool)
    mask[10:15, 5:10] = True
    mask[12:14, 13:18] = True  # 3 background columns (10, 11, 12) between the two
    assert len(boxes_from_map(mask, merge_gap=2)) == 2
    (merged,) = boxes_from_map(mask, merge_gap=3)
    assert merged.as_list() == [5.0, 10.0, 18.0, 15.0]  # tight around the pixels, not around the dilation
    dotted = np.zeros((40, 40), bool)
    dotted[20, 2:38:3] = True  # a dotted crack: single pixels two apart, each a speck alone
    assert _coords(boxes_from_map(dotted, merge_gap=2)) == [[2.0, 20.0, 36.0, 21.0]]


def test_empty_flat_and_malformed_maps_give_no_boxes():
    assert boxes_from_map(np.zeros((20, 20), np.float32)) == []
    assert boxes_from_map(np.full((20, 20), 0.49, np.float32), 0.5) == []
    assert boxes_from_map(np.zeros((0, 0))) == [] and boxes_from_map(np.ones((2, 3, 3))) == []


def test_nan_is_never_above_the_threshold():
    amap = np.full((30, 30), np.nan, np.float32)
    amap[5:10, 5:10] = 0.8
    for threshold in (0.0, 0.5):
        (box,) = boxes_from_map(amap, threshold)
        assert box.as_list() == [5.0, 5.0, 10.0, 10.0] and box.score == pytest.approx(0.8)
    assert boxes_from_map(np.full((5, 5), np.nan), 0.0) == []


def test_order_is_peak_then_area_and_capped():
    amap = np.zeros((60, 60), np.float32)
    amap[2:4, 2:4] = 0.9  # small but strongest
    amap[10:20, 10:20] = 0.6  # large
    amap[30:33, 30:33] = 0.6  # same peak, smaller
    amap[50:52, 50:58] = 0.7
    boxes = boxes_from_map(amap, 0.5)
    assert [b.score for b in boxes] == pytest.approx([0.9, 0.7, 0.6, 0.6])
    assert boxes[2].as_list() == [10.0, 10.0, 20.0, 20.0] and boxes[3].as_list() == [30.0, 30.0, 33.0, 33.0]
    assert _coords(boxes_from_map(amap, 0.5, max_boxes=2)) == _coords(boxes[:2])
    assert [b.label for b in boxes_from_map(amap, 0.5, label_text="scratch")] == ["scratch"] * 4


BLOBS = ((20, 30, 6.0, 0.95), (60, 90, 10.0, 0.7), (75, 20, 3.0, 0.6), (40, 64, 4.0, 0.8))


def _blobs() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:128]
    amap = np.zeros((96, 128), np.float32)
    for cy, cx, sigma, peak in BLOBS:
        amap = np.maximum(amap, peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))
    return amap


def test_without_the_core_step_a_soft_map_and_its_binarised_mask_give_the_same_boxes():
    amap = _blobs()
    for threshold in (0.3, 0.5, DEFAULT_THRESHOLD):
        soft = boxes_from_map(amap, threshold, core=0)
        hard = boxes_from_map(amap >= threshold)
        assert len(soft) >= 2 and sorted(_coords(soft)) == sorted(_coords(hard))
        assert all(b.score >= threshold for b in soft) and all(b.score == 1.0 for b in hard)


def test_a_soft_map_box_frames_the_core_of_each_region():
    """Each box shrinks to its region's pixels near the region's own peak: centred on a Gaussian blob, inside
    the threshold box, side about 2 sigma sqrt(2 ln(1 / core)); every region keeps its box."""
    amap = _blobs()
    for threshold in (0.3, 0.5):
        soft, hard = boxes_from_map(amap, threshold), boxes_from_map(amap >= threshold)
        assert len(soft) == len(hard)
        for s, h in zip(sorted(_coords(soft)), sorted(_coords(hard))):
            assert h[0] <= s[0] and h[1] <= s[1] and s[2] <= h[2] and s[3] <= h[3]
        for cy, cx, sigma, peak in BLOBS:
            if peak < threshold:
                continue
            (box,) = [b for b in soft if b.x1 <= cx < b.x2 and b.y1 <= cy < b.y2]
            cut = max(threshold, BOX_CORE * peak)
            side = 2 * sigma * np.sqrt(2 * np.log(peak / cut))
            assert abs((box.x2 - box.x1) - side) <= 2 and abs((box.y2 - box.y1) - side) <= 2
            centre = ((box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2)
            assert abs(centre[0] - (cx + 0.5)) <= 1 and abs(centre[1] - (cy + 0.5)) <= 1


def test_threshold_is_checked_and_inclusive():
    assert check_threshold(0) == 0.0 and check_threshold(1) == 1.0 and check_threshold("0.25") == 0.25
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"calibrated score in \[0, 1\]"):
            check_threshold(bad)
    assert is_anomalous(0.5) and not is_anomalous(0.4999)
    assert is_anomalous(0.3, 0.3) and not is_anomalous(0.9, 0.95)


def test_an_anomalous_verdict_shows_the_strongest_region_when_no_pixel_reaches_the_threshold():
    """A fused score can pass the threshold while the whole map stays below it (DeepPCB with the default
    model: score 0.598, map peaks about 0.4): the inspector is shown where the map points."""
    amap = np.full((60, 80), 0.05, np.float32)
    amap[10:14, 20:26] = 0.40  # the strongest region
    amap[40:43, 60:63] = 0.20  # weaker than 0.75 x the peak: not boxed
    assert boxes_from_map(amap, 0.5) == []
    assert _coords(boxes_for_verdict(amap, 0.5)) == [[20.0, 10.0, 26.0, 14.0]]
    above = amap.copy()
    above[40:43, 60:63] = 0.9  # a region above the threshold wins, as boxes_from_map gives it
    assert boxes_for_verdict(above, 0.5) == boxes_from_map(above, 0.5)
    assert boxes_for_verdict(np.zeros((8, 8)), 0.5) == []  # a flat map points nowhere
    assert boxes_for_verdict(np.full((8, 8), np.nan), 0.5) == []
