"""Conversation synthesis: every target parses with the answer grammar, boxes sit in each backbone's input
frame."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from anomaly_assistant.backbones import FAMILIES, input_frame
from anomaly_assistant.data_builders import knowledge
from anomaly_assistant.data_builders.conversations import (
    DETECTION_PROMPT,
    SAMPLE_KINDS,
    boxes_in_frame,
    build_samples,
    inspection_answer,
)
from anomaly_assistant.data_builders.records import Record
from anomaly_assistant.data_builders.teacher import Teacher
from anomaly_assistant.finding import Box, location_words
from anomaly_assistant.grammar import parse_answer
from anomaly_assistant.scoring import DEFECT_FAMILIES, canonical_defect, type_similarity

SIZES = [(640, 480), (300, 700), (128, 128), (1024, 333)]


def _records():
    recs = []
    for i, (w, h) in enumerate(SIZES):
        box = [w * 0.1 + i, h * 0.2, w * 0.35, h * 0.5]
        recs.append(
            Record(
                f"a{i}.png",
                1,
                None,
                [box, [w * 0.7, h * 0.7, w * 0.9, h * 0.95]],
                ["scratch", "broken_large", "pin-hole", "chunk of wax missing"][i],
                ["nut", "bottle", "pcb", "candle"][i],
                "fixture",
                image_size=(w, h),
            )
        )
        recs.append(Record(f"n{i}.png", 0, category="wood", source="fixture", image_size=(w, h)))
    return recs


@pytest.mark.parametrize("backbone", FAMILIES)
def test_every_target_parses_and_boxes_map_back(backbone):
    for j, rec in enumerate(_records()):
        frame = input_frame(backbone, rec.image_size)
        for s in build_samples(rec, frame, rng=j):
            assert s.messages[0]["role"] == "user" and s.messages[-1]["role"] == "assistant"
            assert [m["role"] for m in s.messages] == ["user", "assistant"] * (len(s.messages) // 2)
            parsed = parse_answer(s.answer, frame)
            assert parsed.ok, parsed.problems
            assert parsed.verdict == ("anomalous" if rec.gt_label else "normal")
            if s.kind in ("inspect", "dialogue"):
                assert s.messages[1]["content"] == s.answer
            if not rec.gt_label:
                assert parsed.boxes == [] and parsed.defect_type is None
                continue
            assert parsed.defect_type == canonical_defect(rec.defect_type)
            raw = parse_answer(s.answer)  # boxes as written: the input frame
            assert [b.as_list() for b in raw.boxes] == s.boxes_input
            iw, ih = frame.input_size
            assert all(0 <= b[0] < b[2] <= iw and 0 <= b[1] < b[3] <= ih for b in s.boxes_input)
            # back in original pixels the boxes match the ground truth (LLaVA's centre crop may cut some off)
            for gt in rec.gt_boxes:
                visible = frame.to_input(Box(*gt))
                if visible.area == 0:
                    continue
                seen = frame.to_original(visible)  # the part of the box the model can see
                best = max(seen.iou(b) for b in parsed.boxes)
                assert best > 0.8, (backbone, rec.image_size, gt)


def test_box_frames_per_backbone_are_the_backbones_own():
    """Qwen2.5-VL: smart-resized absolute pixels; LLaVA-OV: 384 squash; LLaVA-1.5: shortest edge 336 + centre
    crop."""
    q = input_frame("qwen2_5_vl", (640, 480))
    assert q.input_size == (644, 476) and all(v % 28 == 0 for v in q.input_size)
    ov = input_frame("llava_onevision", (640, 480))
    assert ov.input_size == (384, 384)
    assert boxes_in_frame([[320, 240, 640, 480]], ov) == [[192, 192, 384, 384]]
    ll = input_frame("llava", (640, 480))
    assert ll.input_size == (336, 336)
    assert boxes_in_frame([[80, 0, 560, 480]], ll) == [[0, 0, 336, 336]]  # 448x336 resize, crop offset 56


def test_frames_follow_a_loaded_processor(tiny_models):
    """With a (tiny) processor the frame follows its resize settings, not the real checkpoint's defaults."""
    for fam, (_, proc) in tiny_models.items():
        f = input_frame(fam, (640, 480), proc)
        from anomaly_assistant import backbones

        assert f == backbones.get(fam).input_frame(proc, (640, 480))
        assert f.input_size != input_frame(fam, (640, 480)).input_size or fam == "llava_onevision"


def test_kinds_and_phrasings_vary():
    rec = _records()[0]
    frame = input_frame("qwen2_5_vl", rec.image_size)
    samples = [s for i in range(30) for s in build_samples(rec, frame, rng=i)]
    assert {s.kind for s in samples} == set(SAMPLE_KINDS)
    prompts = {s.messages[0]["content"] for s in samples if s.kind == "inspect"}
    thinks = {parse_answer(s.answer).think for s in samples}
    assert len(prompts) >= 3 and len(thinks) >= 3
    detect = [s for s in samples if s.kind == "detect"]
    assert any(s.messages[0]["content"] == DETECTION_PROMPT for s in detect)
    assert {s.messages[1]["content"] for s in detect} == {"Yes"}
    dialogue_questions = {m["content"] for s in samples if s.kind == "dialogue" for m in s.messages[2::2]}
    assert any("cause" in q.lower() for q in dialogue_questions) and any(
        "where" in q.lower() for q in dialogue_questions
    )
    causes = " ".join(m["content"] for s in samples if s.kind == "dialogue" for m in s.messages[3::2])
    assert any(c in causes for c in knowledge.family_of("scratch").causes)


def test_knowledge_base_families_and_similarity():
    fam = knowledge.family_of
    assert (
        fam("broken_large").name == "missing"
        and fam("blowhole").name == "hole"
        and fam("crack").name == "crack"
    )
    assert fam("mousebite").name == "missing" and fam("short").name == "foreign_object"
    assert fam("chunk of wax missing").name == "missing" and fam("xyz").name == "other"
    assert type_similarity("broken_large", "broken large") == 1.0
    assert type_similarity("pit", "hole") == 0.85
    assert type_similarity("fold", "bent") == 0.6
    assert type_similarity("scratch", "hole") == 0.0
    assert [f.name for f in knowledge.FAMILIES] == list(DEFECT_FAMILIES)  # prose for every family, none extra
    assert location_words([0, 0, 10, 10], (100, 100)) == "upper left"
    assert location_words([45, 45, 55, 55], (100, 100)) == "centre"


class _FakeOpenAI(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][-1]["content"].rsplit("Text: ", 1)[1]
        reply = {
            "choices": [{"message": {"role": "assistant", "content": "Rewritten: " + text + " <answer>"}}]
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_teacher_rewrites_through_openai_endpoint_with_cache(tmp_path, monkeypatch):
    _FakeOpenAI.calls = []  # the handler class is shared with the CLI test
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("ANOMALY_TEACHER_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("ANOMALY_TEACHER_API_KEY", "k")
        monkeypatch.setenv("ANOMALY_TEACHER_MODEL", "m")
        teacher = Teacher.from_env(cache_dir=tmp_path / "cache")
        rec = _records()[0]
        frame = input_frame("qwen2_5_vl", rec.image_size)
        answer, _ = inspection_answer(rec, frame, rng=0, rewrite=teacher)
        parsed = parse_answer(answer)
        assert (
            parsed.ok
            and parsed.think.startswith("Rewritten: ")
            and parsed.rationale.startswith("Rewritten: ")
        )
        assert (
            _FakeOpenAI.calls[0]["path"] == "/v1/chat/completions"
            and _FakeOpenAI.calls[0]["auth"] == "Bearer k"
        )
        assert "defect=scratch" in _FakeOpenAI.calls[0]["body"]["messages"][-1]["content"]
        n = len(_FakeOpenAI.calls)
        again, _ = inspection_answer(rec, frame, rng=0, rewrite=teacher)
        assert again == answer and len(_FakeOpenAI.calls) == n  # served from the on-disk cache
        assert teacher.stats["cached"] == 2 and len(list((tmp_path / "cache").glob("*.json"))) == 2
    finally:
        server.shutdown()
    # an unreachable endpoint falls back to the templated text
    dead = Teacher(base_url="http://127.0.0.1:9/v1", model="m", cache_dir=tmp_path / "c2", timeout_s=2)
    assert dead("rationale", "A scratch.", {}) == "A scratch." and dead.stats["failed"] == 1
    assert np.isfinite(len(answer))


def test_anomalous_without_boxes_never_invents_a_location():
    rec = Record("cell.png", 1, defect_type="anomaly", category="elpv", image_size=(300, 300))
    frame = input_frame("qwen2_5_vl", rec.image_size)
    for i in range(20):
        for s in build_samples(rec, frame, rng=i):
            parsed = parse_answer(s.answer)
            assert parsed.ok and parsed.verdict == "anomalous" and parsed.boxes == []
            text = " ".join(m["content"] for m in s.messages)
            assert "marked region" not in text and "Where" not in text
