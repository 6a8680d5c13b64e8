"""One threshold per call, session or assistant drives the screener's label, the verdict and the boxes."""

from __future__ import annotations

import pytest

from anomaly_assistant import AnomalyAssistant
from anomaly_assistant.images import load_image
from anomaly_assistant.localize import DEFAULT_THRESHOLD, boxes_from_map
from anomaly_assistant.resources import sample_images, sample_references


@pytest.fixture(scope="module")
def references():
    return [load_image(p) for p in sample_references()]


@pytest.fixture(scope="module")
def scratch():
    return load_image(next(p for p in sample_images() if p.stem == "scratch"))


@pytest.fixture(scope="module")
def expert():
    return AnomalyAssistant.expert_only()


@pytest.fixture(scope="module")
def score(expert, scratch, references) -> float:
    """The scratch sample's calibrated score: thresholds below and above it must flip the verdict."""
    value = expert.screen([scratch], references=references)[0].score
    assert 0.0 < value < 1.0
    return value


def _assert_agrees(finding, threshold, label=None):
    """Verdict, boxes (and the screener's label) all follow `score >= threshold`."""
    anomalous = finding.score >= threshold
    assert finding.verdict == ("anomalous" if anomalous else "normal")
    if label is not None:
        assert label == anomalous
    if anomalous:
        expected = boxes_from_map(finding.anomaly_map, threshold)
        # a box's score is its peak rounded to 4 decimals: at threshold == score it may round below it
        assert finding.boxes == expected and expected
        assert all(b.score >= threshold - 5e-5 for b in finding.boxes)
    else:
        assert finding.boxes == []


def test_verdict_flips_with_the_threshold_and_label_verdict_boxes_agree(expert, scratch, references, score):
    screener = expert.reference_screener(references)
    verdicts = {}
    for threshold in (0.0, score / 2, score, (1 + score) / 2, 1.0, DEFAULT_THRESHOLD):
        (finding,) = expert.screen([scratch], references=references, threshold=threshold)
        (result,) = screener.predict([scratch], threshold)
        assert result.score == pytest.approx(finding.score)
        _assert_agrees(finding, threshold, result.label)
        verdicts[threshold] = finding.verdict
    assert verdicts[score / 2] == verdicts[score] == "anomalous"  # a score at the threshold is anomalous
    assert verdicts[(1 + score) / 2] == verdicts[1.0] == "normal"
    low, default = (expert.screen([scratch], references=references, threshold=t)[0] for t in (0.0, 0.5))
    assert low.boxes[0].area >= default.boxes[0].area  # a lower threshold grows the regions


def test_session_threshold_overrides_the_assistants(scratch, references, score):
    strict = AnomalyAssistant.expert_only(threshold=(1 + score) / 2)
    assert strict.threshold == pytest.approx((1 + score) / 2)
    assert strict.screen([scratch], references=references)[0].verdict == "normal"
    assert strict.chat(references=references).inspect(scratch).verdict == "normal"  # None: the assistant's
    lenient = strict.chat(references=references, threshold=score / 2)
    finding = lenient.inspect(scratch)
    assert finding.verdict == "anomalous" and finding.boxes
    _assert_agrees(finding, score / 2)
    assert strict.screen([scratch], references=references, threshold=score / 2)[0].verdict == "anomalous"
    (batched,) = strict.inspect_batch([scratch], references=references, threshold=score / 2)
    assert batched.verdict == "anomalous"


def test_out_of_range_thresholds_are_refused(references):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AnomalyAssistant.expert_only(threshold=1.5)
    expert = AnomalyAssistant.expert_only()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expert.chat(threshold=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expert.screen([references[0]], references=references, threshold=float("nan"))


def test_the_language_model_fallback_uses_the_same_threshold(scratch, references):
    """A tiny random model does not write the grammar: the expert's verdict and boxes decide, at the call's
    threshold, the session's or the assistant's (from_pretrained(threshold=))."""
    tiny = AnomalyAssistant.from_pretrained("tiny", threshold=1.0)  # calibrated scores stay below 1
    by_assistant = tiny.inspect_batch([scratch], references=references, max_new_tokens=4)[0]
    assert by_assistant.source == "expert" and by_assistant.parse_error and 0.0 < by_assistant.score < 1.0
    low = by_assistant.score / 2
    by_call = tiny.inspect_batch([scratch], references=references, threshold=low, max_new_tokens=4)[0]
    by_session = tiny.chat(references=references, threshold=low).inspect(scratch, max_new_tokens=4)
    assert by_assistant.verdict == "normal" and by_call.verdict == by_session.verdict == "anomalous"
    for finding, threshold in ((by_assistant, 1.0), (by_call, low), (by_session, low)):
        assert finding.score == pytest.approx(by_assistant.score, abs=1e-6)
        _assert_agrees(finding, threshold)
