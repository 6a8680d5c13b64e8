"""VisA-D&R detection and reasoning: loading, per-class and per-kind aggregation (MMAD: test_eval_mmad.py)."""

import json

import pytest

from anomaly_assistant.eval import detection, reasoning


def test_detection_macro_average():
    preds = [
        {"category": "a", "gt_label": 1, "pred_label": 1, "score": None},
        {"category": "a", "gt_label": 0, "pred_label": 0, "score": None},
        {"category": "b", "gt_label": 1, "pred_label": 0, "score": None},
        {"category": "b", "gt_label": 0, "pred_label": 0, "score": None},
        {"category": "b", "gt_label": 1, "pred_label": 1, "score": None},
    ]
    res = detection.compute(preds)
    assert set(res) >= {"accuracy", "precision", "recall", "f1", "n_images", "per_class"}
    assert res["per_class"]["a"]["accuracy"] == 1.0
    assert res["per_class"]["b"]["accuracy"] == pytest.approx(2 / 3)
    assert res["accuracy"] == pytest.approx((1 + 2 / 3) / 2)  # macro, not pooled (4/5)
    assert res["micro"]["accuracy"] == pytest.approx(4 / 5)
    assert res["recall"] == pytest.approx((1 + 0.5) / 2) and "image_auroc" not in res


def test_detection_suggests_the_threshold_its_labels_support():
    """With expert scores, compute() names the cut that separates the labelled images, pooled and per class:
    a part whose good images score high gets its own, higher threshold."""
    scores = {"a": ([0.30, 0.40], [0.60, 0.80]), "b": ([0.62, 0.66], [0.90, 0.95])}  # (good, defective)
    preds = [{"category": c, "gt_label": y, "pred_label": int(s >= 0.5), "score": s}
             for c, (good, bad) in scores.items() for y, group in ((0, good), (1, bad)) for s in group]
    res = detection.compute(preds)
    assert res["per_class"]["a"]["suggested_threshold"] == pytest.approx(0.5)
    assert res["per_class"]["b"]["suggested_threshold"] == pytest.approx(0.78)
    # pooled, b's good images (0.62, 0.66) and a's defect at 0.60 overlap: recall minus false alarms is
    # highest flagging from 0.80 up (recall 0.75, no false alarm), and the cut sits halfway from 0.66
    assert res["suggested_threshold"] == pytest.approx(0.73)
    assert detection.compute(preds[:2])["suggested_threshold"] is None  # one class only: nothing to suggest


def test_detection_loads_mvtec_with_references(mvtec_root):
    recs, refs = detection.load(mvtec_root, "brick", references=2)
    assert len(recs) == 8 and [p.rsplit("/", 1)[1] for p in refs["brick"]] == ["000.png", "001.png"]
    assert all(r.split == "test" for r in recs)


def _visa_dr(tmp_path, mvtec_root):
    """A VisA-D&R-style LLaVA JSON over the fixture images."""
    items = []
    for i in range(3):
        items.append({
            "id": f"bad{i}",
            "image": f"brick/test/scratch/{i:03d}.png",
            "metadata": {"anomaly": True, "class": "brick"},
            "conversations": [
                {"from": "human", "value": "<image>\nIs there any anomaly in the image? Answer yes or no."},
                {"from": "gpt", "value": "Yes."},
                {"from": "human", "value": "Describe the anomaly and where it is."},
                {"from": "gpt", "value": "A dark scratch crosses the upper left bricks."},
                {"from": "human", "value": "What could have caused it, and how can it be prevented?"},
                {"from": "gpt", "value": "Scraping during handling; use protective covers."},
            ],
        })
    for i in range(2):
        items.append({"id": f"ok{i}", "image": f"brick/test/good/{i:03d}.png",
                      "metadata": {"anomaly": False, "class": "brick"},
                      "conversations": [{"from": "human", "value": "<image>\nAny defect?"},
                                        {"from": "gpt", "value": "No."}]})
    path = mvtec_root / "visa_dr.json"
    path.write_text(json.dumps(items))
    return path


def test_reasoning_question_kinds_and_dialogue_loading(tmp_path, mvtec_root):
    assert reasoning.question_kind("What could have caused this defect?") == "complex"
    assert reasoning.question_kind("How can this be prevented in production?") == "complex"
    assert reasoning.question_kind("Describe the anomaly: where is it and what type?") == "low_level"
    assert reasoning.question_kind(detection.DETECTION_PROMPT) == "detection"
    recs = reasoning.load(_visa_dr(tmp_path, mvtec_root))
    assert len(recs) == 3  # anomalous images only
    kinds = [k for _, _, k in reasoning.qa_pairs(recs[0])]
    assert kinds == ["detection", "low_level", "complex"]
    # Few-shot detection on the JSON: references are left out of the evaluated set.
    det, refs = detection.load(mvtec_root / "visa_dr.json", references=1)
    assert len(refs["brick"]) == 1 and refs["brick"][0] not in {r.image_path for r in det} and len(det) == 4


def test_reasoning_scores_and_summary_split_by_kind():
    turns = [
        {"category": "c", "defect_type": "crack", "kind": "detection", "question": "Any defect? yes or no",
         "reference": "Yes.", "answer": "Yes"},
        {"category": "c", "defect_type": "crack", "kind": "low_level", "question": "Describe it.",
         "reference": "A crack near the left edge.", "answer": "There is a crack near the left edge."},
        {"category": "c", "defect_type": "crack", "kind": "complex", "question": "Why?",
         "reference": "Thermal stress during firing.", "answer": "The weather is sunny."},
    ]

    class FixedJudge:
        def score(self, question, reference, answer, context=""):
            from anomaly_assistant.eval.judge import JudgeScore

            assert "crack" in context
            return JudgeScore(6.0 if "crack" in answer else 2.0, 8.0, "8 x\n")

    reasoning.score_turns(turns, judge=FixedJudge())
    assert "rouge_l" not in turns[0]
    assert turns[1]["rouge_l"] > 0.5 and turns[1]["sbert"] > 0.7 and turns[2]["sbert"] < 0.3
    res = reasoning.summarize(turns, judged=True)
    assert res["low_level"]["judge_score"] == 6.0 and res["complex"]["judge_score"] == 2.0
    assert res["complex"]["judge_relative"] == pytest.approx(0.25)
    assert res["low_level"]["n_turns"] == 1 and res["per_class"]["c"]["complex"]["n_turns"] == 1
    assert reasoning.summarize(turns, judged=False)["low_level"]["judge_score"] is None
