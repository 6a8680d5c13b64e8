"""The answer grammar: round trips, tolerance, and a parser that never raises."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_assistant.finding import Box, Frame
from anomaly_assistant.grammar import MAX_BOXES, parse_answer, render_answer

coord = st.integers(min_value=0, max_value=4000)
box_lists = st.lists(st.tuples(coord, coord, coord, coord).map(
    lambda t: [min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3])]), max_size=5)
free_text = st.text(max_size=200)


@settings(max_examples=300, deadline=None)
@given(think=free_text, boxes=box_lists, defect=st.one_of(st.none(), st.text(min_size=1, max_size=30)),
       rationale=free_text, anomalous=st.booleans())
def test_render_then_parse_round_trips(think, boxes, defect, rationale, anomalous):
    verdict = "anomalous" if anomalous else "normal"
    text = render_answer(think, verdict, defect, boxes, rationale)
    parsed = parse_answer(text)
    assert parsed.ok, parsed.problems
    assert parsed.verdict == verdict
    if anomalous:
        assert [b.as_list() for b in parsed.boxes] == [[float(v) for v in b] for b in boxes]
        expected_defect = (
            defect.replace("<think>", "").replace("</think>", "")
            .replace("<answer>", "").replace("</answer>", "").strip()
            if defect
            else None
        )
        assert parsed.defect_type == (expected_defect or None)
    else:
        assert parsed.boxes == [] and parsed.defect_type is None
    assert "<answer>" not in parsed.rationale and "</think>" not in parsed.think


TAG_SOUP = st.sampled_from([
    "<think>", "</think>", "<answer>", "</answer>", "{", "}", "[", "]", '"', "\\", ":", ",",
    '"verdict"', '"boxes"', '"anomalous"', '"normal"', "null", "1e999", "-0", "NaN", "\x00",
    '{"verdict": "anomalous", "boxes": [[', "]]}", "bbox_2d", "🙂", "\n",
])


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=400), st.lists(TAG_SOUP, max_size=80).map("".join),
                 st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_parser_never_raises_on_any_text(text):
    parsed = parse_answer(text, frame=Frame.resize((640, 480), (644, 476)))
    assert parsed.verdict in (None, "normal", "anomalous")
    assert all(isinstance(b, Box) and b.x1 <= b.x2 and b.y1 <= b.y2 for b in parsed.boxes)
    assert all(0 <= b.x1 and b.x2 <= 640 and 0 <= b.y1 and b.y2 <= 480 for b in parsed.boxes)
    if not parsed.ok:
        assert parsed.problems


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=10)),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
))
def test_parser_survives_any_json_payload(payload):
    for key in ("verdict", "boxes", "defect_type", "rationale"):
        text = "<think>t</think><answer>" + json.dumps({key: payload, "verdict": "anomalous"}) + "</answer>"
        parsed = parse_answer(text)
        assert parsed.verdict in (None, "normal", "anomalous")


@pytest.mark.parametrize("text", [
    "{" * 100_000,
    "[" * 10_000,
    '<answer>{"verdict": "anomalous", "boxes": ' + "[" * 5000 + "]" * 5000 + "}</answer>",
    "<think>" * 20_000,
    '<answer>{"verdict": "anomalous", "boxes": [[1e999, 0, 5, 5]]}</answer>',
    None,
    b"bytes",
])
def test_adversarial_inputs_are_bounded_and_safe(text):
    parsed = parse_answer(text)
    assert not parsed.ok
    assert parsed.problems


def test_tolerant_forms_are_understood_but_flagged():
    text = ('Sure! <answer>```json\n{"verdict": "defective", "defect_type": "crack", '
            '"boxes": [{"bbox_2d": [50, 40, 10, 20], "label": "crack"}], "rationale": "r"}\n```</answer>')
    parsed = parse_answer(text)
    assert parsed.verdict == "anomalous"
    assert parsed.boxes[0].as_list() == [10.0, 20.0, 50.0, 40.0] and parsed.boxes[0].label == "crack"
    assert not parsed.ok and any("think" in p for p in parsed.problems)


def test_normal_verdict_drops_boxes_and_type():
    parsed = parse_answer('<think>ok</think><answer>{"verdict": "normal", "defect_type": "scratch", '
                          '"boxes": [[1, 1, 5, 5]], "rationale": ""}</answer>')
    assert parsed.verdict == "normal" and parsed.boxes == [] and parsed.defect_type is None
    assert any("normal verdict" in p for p in parsed.problems)


def test_too_many_boxes_are_capped():
    boxes = [[i, i, i + 2, i + 2] for i in range(MAX_BOXES + 10)]
    parsed = parse_answer(render_answer("t", "anomalous", "spot", boxes, "r"))
    assert len(parsed.boxes) == MAX_BOXES and any("more than" in p for p in parsed.problems)


def test_frame_converts_boxes_to_original_pixels_and_drops_outside():
    frame = Frame.resize((1000, 500), (500, 250))  # half size
    text = render_answer("t", "anomalous", "hole", [[10, 20, 30, 40], [600, 300, 700, 400]], "r")
    parsed = parse_answer(text, frame=frame)
    assert [b.as_list() for b in parsed.boxes] == [[20.0, 40.0, 60.0, 80.0]]
    assert any("outside" in p for p in parsed.problems)
    flat = parse_answer(render_answer("t", "anomalous", "hole", [[10, 10, 10, 70]], "r"), frame=frame)
    assert flat.boxes == [] and any("[10.0, 10.0, 10.0, 70.0] has zero width or height" in p
                                    for p in flat.problems)


def test_render_rejects_unknown_verdict():
    with pytest.raises(ValueError):
        render_answer("t", "maybe")
