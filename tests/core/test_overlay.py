"""The one overlay renderer: heat where the map stands out, boxes visible on black and white, header and
scale."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly_assistant.finding import Box, Finding
from anomaly_assistant.overlay import colour_ramp, render_overlay

HEADER = 34  # header strip height
BAR = 96  # colour-bar panel width
DEFAULT_BOXES = (Box(40, 40, 60, 60),)


def _finding(verdict="anomalous", score=0.8, boxes=DEFAULT_BOXES, peak=0.9):
    amap = np.zeros((100, 100), np.float32)
    amap[40:60, 40:60] = peak
    return Finding(verdict=verdict, score=score, boxes=list(boxes), anomaly_map=amap, image_size=(100, 100))


@pytest.mark.parametrize("grey", [0, 255])
def test_heat_marks_the_hot_spot_and_leaves_the_rest(grey):
    image = Image.new("L", (100, 100), grey)
    out = np.asarray(render_overlay(image, _finding(boxes=()), min_side=100))
    assert out.shape == (100 + HEADER, 100 + BAR, 3)
    part = out[HEADER:, :100].astype(int)
    assert np.abs(part[50, 50] - grey).max() > 60  # the hot spot is coloured
    assert np.abs(part[5, 5] - grey).max() <= 2  # the surface keeps its own look


@pytest.mark.parametrize("grey", [0, 255])
def test_boxes_are_visible_on_black_and_on_white(grey):
    image = Image.new("RGB", (100, 100), (grey,) * 3)
    finding = _finding(boxes=[Box(20, 20, 80, 80)])
    finding.anomaly_map = None
    part = np.asarray(render_overlay(image, finding, min_side=100))[HEADER:, :100].astype(int)
    edge = part[50, 19:23]  # across the left edge of the box
    assert np.abs(edge - grey).max() > 200


def test_header_badge_colour_follows_the_verdict():
    image = Image.new("RGB", (100, 100), (128, 128, 128))
    red = np.asarray(render_overlay(image, _finding()))[15, 9]
    green = np.asarray(render_overlay(image, _finding(verdict="normal", score=0.1, boxes=())))[15, 9]
    assert red[0] > 150 and red[1] < 80
    assert green[1] > 100 and green[0] < 80


def test_small_images_are_enlarged_and_large_ones_reduced():
    small = render_overlay(Image.new("RGB", (64, 32)), _finding(), min_side=384)
    large = render_overlay(Image.new("RGB", (3000, 1500)), _finding(), max_side=1024)
    assert small.size == (384 + BAR, 192 + HEADER)
    assert large.size == (1024 + BAR, 512 + HEADER)


def test_no_map_means_no_colour_bar():
    finding = _finding()
    finding.anomaly_map = None
    out = np.asarray(render_overlay(Image.new("RGB", (100, 100), (255, 255, 255)), finding, min_side=100))
    assert np.all(out[HEADER + 50, 100 + 20] == (25, 25, 25))


def test_colour_ramp_is_absolute_and_monotone_in_hue():
    ends = colour_ramp(np.array([0.0, 1.0, np.nan]))
    assert ends[0, 2] > ends[0, 0]  # low = blue
    assert ends[1, 0] > ends[1, 2]  # high = red
    assert np.array_equal(ends[2], ends[0])  # NaN counts as 0
