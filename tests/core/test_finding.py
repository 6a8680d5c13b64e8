"""Finding JSON round trip and exact Frame conversions."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_assistant.finding import Box, Finding, Frame


def test_finding_json_round_trip_with_map():
    amap = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    finding = Finding(
        verdict="anomalous",
        score=0.83,
        boxes=[Box(1, 2, 30.5, 40, "scratch")],
        defect_type="scratch",
        rationale="a thin line",
        think="look",
        anomaly_map=amap,
        raw_text="<think>…",
        parse_error=None,
        source="model",
        image_size=(90, 70),
        image_path="a.png",
    )
    back = Finding.loads(finding.dumps())
    assert back.verdict == "anomalous" and back.score == 0.83 and back.boxes == finding.boxes
    assert back.image_size == (90, 70) and back.image_path == "a.png"
    np.testing.assert_array_equal(back.anomaly_map, amap)
    assert back.anomaly_map.dtype == np.float32
    assert "anomaly_map" not in finding.to_json(include_map=False)


def test_map_source_round_trips_and_json_without_it_still_loads():
    finding = Finding(verdict="anomalous", score=0.7, source="expert", map_source="reference")
    data = finding.to_json()
    assert data["map_source"] == "reference" and data["notes"] == []
    assert Finding.from_json(data).map_source == "reference"
    del data["map_source"]  # JSON written before the field existed
    assert Finding.from_json(data).map_source is None
    # ... which carried the tag as a note: it becomes the field, the other notes stay
    old = data | {"notes": ["map source: ltfm+reference", "something else"]}
    back = Finding.from_json(old)
    assert back.map_source == "ltfm+reference" and back.notes == ["something else"]
    assert Finding.from_json({"verdict": "normal"}).map_source is None


def test_non_finite_score_serialises_as_null():
    assert Finding(score=float("nan")).to_json()["score"] is None


def test_box_iou():
    assert Box(0, 0, 10, 10).iou(Box(5, 0, 15, 10)) == 5 * 10 / (200 - 50)
    assert Box(0, 0, 1, 1).iou(Box(2, 2, 3, 3)) == 0.0


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), iw=st.integers(1, 2000), ih=st.integers(1, 2000),
       fx=st.fractions(0, 1, max_denominator=50), fy=st.fractions(0, 1, max_denominator=50))
def test_frame_round_trip_is_exact_on_input_grid_points(w, h, iw, ih, fx, fy):
    frame = Frame.resize((w, h), (iw, ih))
    x, y = float(fx * iw), float(fy * ih)
    box = Box(x, y, x, y)
    back = frame.to_input(frame.to_original(box, clip=False), clip=False)
    assert abs(back.x1 - x) <= 1e-9 * max(1.0, x) and abs(back.y1 - y) <= 1e-9 * max(1.0, y)


def test_resize_then_center_crop_matches_hand_computation():
    # 500x375 -> shortest edge 336 -> 448x336 -> centre crop 336: left offset 56
    frame = Frame.resize_then_center_crop((500, 375), (448, 336), (336, 336))
    assert frame.offset == (Fraction(56), Fraction(0))
    inside = frame.to_input(Box(100, 75, 200, 150))
    assert inside.as_list() == [33.6, 67.2, 123.2, 134.4]  # exact rationals, no float drift
    assert frame.to_original(Box(0, 0, 336, 336)).as_list() == [62.5, 0.0, 437.5, 375.0]
    assert Frame.from_json(frame.to_json()) == frame
