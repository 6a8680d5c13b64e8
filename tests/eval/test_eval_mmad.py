"""MMAD protocol: a fixture in MMAD's real JSON layout, fixed replies, and figures computed by hand."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_assistant.eval import mmad

DETECT = {"Question": "Is there any defect in the object?", "Options": {"A": "Yes.", "B": "No."},
          "type": "Anomaly Detection"}
CLASSIFY = {"Question": "What type of defect is on the bottle?", "type": "Defect Classification",
            "Options": {"A": "Contamination.", "B": "Broken large.", "C": "Scratch.", "D": "Deformation."}}
STRUCTURE = {"Question": "How many caps does the bottle have?", "type": "Object Structure",
             "Options": {"A": "None.", "B": "One.", "C": "Two."}}
DETAILS = {"Question": "What colour is the bottle's rim?", "type": "Object Details",
           "Options": {"A": "Red.", "B": "Green.", "C": "Dark grey.", "D": "White."}}

# (MMAD key, [(question, answer letter, the fixed reply)])
ANSWERS = [
    ("DS-MVTec/bottle/image/broken_large/000.png", [
        (DETECT, "A", "Yes, there is an anomaly."),  # option text "Yes." -> A, right
        (CLASSIFY, "B", "B"),  # right
        (STRUCTURE, "B", ""),  # unreadable -> wrong (upstream would drop it)
    ]),
    ("DS-MVTec/bottle/image/good/001.png", [
        (DETECT, "B", "Answer: A"),  # A, wrong
        (DETAILS, "C", "(c)"),  # C, right
    ]),
    ("DS-MVTec/bottle/image/contamination/002.png", [
        (DETECT, "A", "No."),  # B, wrong
        (CLASSIFY, "A", "contamination"),  # option text -> A, right
    ]),
    ("MVTec-LOCO/juice_bottle/test/logical_anomalies/000.png", [
        (DETECT, "A", "A"),  # right
        (STRUCTURE, "B", "ｂ"),  # full-width lowercase b -> B, right
    ]),
    ("MVTec-LOCO/juice_bottle/test/good/001.png", [
        (DETECT, "B", "There is no defect."),  # option text "No." -> B, right
    ]),
]


def _write_mmad(root: Path) -> Path:
    """mmad.json keyed by image path, as MMAD ships it, over crops of a real CC0 photo (scikit-image)."""
    from skimage import data

    photo = data.astronaut()  # [512, 512, 3] uint8
    items = {}
    for i, (key, qa) in enumerate(ANSWERS):
        ds, obj = key.split("/")[:2]
        good = f"{'MVTec-AD' if ds == 'DS-MVTec' else ds}/{obj}/train/good"  # DS-MVTec's templates: MVTec AD
        random_ref, similar_ref = f"{good}/{10 + i:03d}.png", f"{good}/{20 + i:03d}.png"
        for j, rel in enumerate((key, random_ref, similar_ref)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[40 * i + 8 * j:][:64, :64]).save(root / rel)
        mask = None
        if "/good/" not in key:  # MMAD's masks are colour renderings next to the images
            mask = re.sub(r"/(image|test)/(.*)\.png$", r"/rbg_mask/\2_rbg_mask.png", key)
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            colour = np.zeros((64, 64, 3), np.uint8)
            colour[20:30, 10:40] = (255, 0, 0)
            Image.fromarray(colour).save(root / mask)
        items[key] = {
            "image_path": key,
            "mask_path": mask,
            "random_templates": [random_ref],
            "similar_templates": [similar_ref],
            "conversation": [{**q, "Answer": letter} for q, letter, _ in qa],
        }
    (root / "mmad.json").write_text(json.dumps(items))
    return root / "mmad.json"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return mmad.load(_write_mmad(tmp_path_factory.mktemp("mmad")))


def _rows(records):
    replies = {key: [reply for _, _, reply in qa] for key, qa in ANSWERS}
    return [mmad.answer_row(rec, q, reply)
            for rec in records for q, reply in zip(rec.meta["questions"], replies[rec.meta["key"]])]


def test_mmad_scores_like_the_official_scorer(records):
    assert sorted(r.meta["key"] for r in records) == sorted(k for k, _ in ANSWERS)
    res = mmad.compute(_rows(records))
    ds, loco = res["per_dataset"]["DS-MVTec"], res["per_dataset"]["MVTec-LOCO"]
    # DS-MVTec, Anomaly Detection: anomalous images 000 right, 002 wrong -> 1/2; normal image 001 wrong
    # -> 0/1; balanced accuracy (1/2 + 0) / 2 = 0.25 (plain accuracy would be 1/3)
    assert ds["Anomaly Detection"] == pytest.approx(0.25)
    assert ds["Defect Classification"] == pytest.approx(1.0)  # 000 right, 002 right
    # Object Structure (000: empty reply, wrong) and Object Details (001: right) merge: 1/2
    assert ds["Object Analysis"] == pytest.approx(0.5) and "Object Structure" not in ds
    assert ds["average"] == pytest.approx((0.25 + 1.0 + 0.5) / 3)  # 0.5833
    # MVTec-LOCO: detection (1/1 + 1/1) / 2 = 1.0, Object Analysis 1/1, average 1.0
    assert (loco["Anomaly Detection"], loco["Object Analysis"], loco["average"]) == (1.0, 1.0, 1.0)
    assert res["accuracy"] == pytest.approx(((0.25 + 1.0 + 0.5) / 3 + 1.0) / 2)  # mean over datasets: 0.7917
    assert res["per_type"]["Anomaly Detection"]["accuracy"] == pytest.approx((0.25 + 1.0) / 2)
    assert res["per_type"]["Object Analysis"]["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert res["per_type"]["Defect Classification"]["accuracy"] == pytest.approx(1.0)  # DS-MVTec only
    assert set(res["per_type"]) == {"Anomaly Detection", "Defect Classification", "Object Analysis"}
    # 7 of 10 answers right overall; the empty reply is counted (as wrong), not dropped
    assert res["micro_accuracy"] == pytest.approx(0.7)
    assert (res["n_questions"], res["n_images"], res["unparsed"]) == (10, 5, 1)
    assert res["read_by"] == {"letter": 5, "option text": 4, "nothing": 1}


def test_mmad_records_templates_and_questions(records):
    rec = next(r for r in records if r.meta["key"] == "DS-MVTec/bottle/image/broken_large/000.png")
    assert mmad.references(rec)[0].endswith("MVTec-AD/bottle/train/good/010.png")  # random_templates[0]
    assert mmad.references(rec, "similar")[0].endswith("MVTec-AD/bottle/train/good/020.png")
    assert rec.reference_path == mmad.references(rec, "similar")[0] and rec.meta["dataset"] == "DS-MVTec"
    with pytest.raises(ValueError):
        mmad.references(rec, "nearest")
    text = mmad.question_text({**DETECT, "Options": {"B": "No.", "A": "Yes."}})
    assert "A. Yes.\nB. No." in text and text.endswith(mmad.ANSWER_RULE)
    assert mmad.is_normal_image("MVTec-LOCO/juice_bottle/test/good/001.png")
    assert not mmad.is_normal_image("GoodsAD/food_box/test/goods_damaged/000.png")  # whole folder names only
    assert mmad.dataset_of("VisA/candle/test/good/000.png") == "VisA"
    assert rec.gt_mask.endswith("000_rbg_mask.png")
    assert mmad.compute([])["n_questions"] == 0 and mmad.compute([])["accuracy"] is None
