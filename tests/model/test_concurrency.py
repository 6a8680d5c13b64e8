"""One assistant, many concurrent inspections: each call keeps its own reference, expert outputs, screener."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from anomaly_assistant import AnomalyAssistant

CALLS = 12  # concurrent inspections: 12 different images, 4 different reference sets
WORKERS = 8


def _texture(seed: int, period: float, size=(160, 120), spot: tuple[int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.arange(size[0])[None, :]
    base = 120 + 25 * np.sin(x / period) + rng.normal(0, 4, (size[1], size[0]))
    img = Image.fromarray(np.clip(np.repeat(base[..., None], 3, axis=2), 0, 255).astype("uint8"))
    if spot is not None:
        cx, cy = spot
        ImageDraw.Draw(img).ellipse((cx - 12, cy - 10, cx + 12, cy + 10), fill=(10, 10, 10))
    return img


def _reference_sets() -> list[list[Image.Image]]:
    """Four sets of normals that differ in texture period, so each fits a different screener."""
    return [[_texture(100 * k + i, period=2.0 + k) for i in range(2)] for k in range(4)]


def _jobs() -> list[tuple[Image.Image, list[Image.Image]]]:
    """(image, references) per call: every image differs (size, texture, spot); reference sets rotate."""
    refs = _reference_sets()
    jobs = []
    for i in range(CALLS):
        spot = (30 + 9 * i, 25 + 6 * i) if i % 3 else None
        image = _texture(1000 + i, period=2.0 + i % 4, size=(150 + 7 * i, 110 + 5 * i), spot=spot)
        jobs.append((image, refs[i % len(refs)]))
    return jobs


def _inspect(assistant: AnomalyAssistant, image: Image.Image, references: list[Image.Image]):
    return assistant.chat(references=references).inspect(image, max_new_tokens=12)


def _assert_same(got, want) -> None:
    assert got.verdict == want.verdict and got.source == want.source
    assert got.raw_text == want.raw_text
    assert got.score == pytest.approx(want.score, abs=1e-6)
    assert [b.as_list() for b in got.boxes] == [b.as_list() for b in want.boxes]
    assert got.anomaly_map.shape == want.anomaly_map.shape
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=1e-6)


@pytest.mark.parametrize("kind", ["tiny", "tiny_score_views", "expert_only"])
def test_concurrent_inspections_equal_the_same_calls_alone(kind):
    def build():
        if kind == "expert_only":
            return AnomalyAssistant.expert_only()
        assistant = AnomalyAssistant.from_pretrained("tiny")
        if kind == "tiny_score_views":  # each call's flipped-view scores travel with that call
            assistant.model.model.expert.mark_trained().config.score_views = ["hflip", "vflip"]
        return assistant

    jobs = _jobs()
    solo = build()
    alone = [_inspect(solo, image, refs) for image, refs in jobs]  # one call at a time
    assert len({round(f.score, 6) for f in alone}) > CALLS // 2  # the calls really differ from each other

    shared = build()  # its screeners are fitted while the inspections run, from several threads at once
    start = threading.Barrier(WORKERS)

    def run(indexed_job):
        index, (image, refs) = indexed_job
        if index < WORKERS:  # the first WORKERS calls set off together
            start.wait(timeout=60)
        return _inspect(shared, image, refs)

    with ThreadPoolExecutor(WORKERS) as pool:
        together = list(pool.map(run, enumerate(jobs)))
    for got, want in zip(together, alone):
        _assert_same(got, want)


def test_one_new_reference_set_asked_from_many_threads_is_fitted_once():
    assistant = AnomalyAssistant.expert_only()
    references = _reference_sets()[0]
    start = threading.Barrier(WORKERS)

    def ask(_):
        start.wait(timeout=30)
        return assistant.reference_screener(references)

    with ThreadPoolExecutor(WORKERS) as pool:
        screeners = list(pool.map(ask, range(WORKERS)))
    assert all(s is screeners[0] for s in screeners)
    assert assistant.reference_screener(list(references)) is screeners[0]  # same pixels, same cached screener


def test_screening_timings_belong_to_the_calling_thread():
    from anomaly_assistant.expert.reference import record_timings

    screener = AnomalyAssistant.expert_only().reference_screener(_reference_sets()[1])
    images = [image for image, _ in _jobs()[:4]]
    screening_started, idle_done = threading.Event(), threading.Event()

    def idle():  # records while the other thread screens, without screening itself
        with record_timings() as timings:
            screening_started.wait(timeout=30)
            idle_done.wait(timeout=30)
        return timings

    def busy():
        with record_timings() as timings:
            screening_started.set()
            screener.predict(images)
        idle_done.set()
        return timings

    with ThreadPoolExecutor(2) as pool:
        idle_timings, busy_timings = pool.submit(idle), pool.submit(busy)
        idle_timings, busy_timings = idle_timings.result(), busy_timings.result()
    assert idle_timings == {"extract": 0.0, "match": 0.0}
    assert busy_timings["extract"] > 0 and busy_timings["match"] > 0


def test_intra_op_threads_are_set_once_for_the_process_and_not_by_a_call():
    import torch

    from anomaly_assistant.expert.sources import set_intra_op_threads

    before = set_intra_op_threads(1)
    try:
        AnomalyAssistant.expert_only().screen([_jobs()[1][0]], references=_reference_sets()[2])
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            set_intra_op_threads(0)
    finally:
        set_intra_op_threads(before)
