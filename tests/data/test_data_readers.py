"""Every reader on a fixture in its exact published layout, and on the real-dev data where it exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomaly_assistant.data_builders.records import Record, SkipLog, load_mask
from anomaly_assistant.data_builders.sources import (
    DEEPPCB_TYPES,
    detect_kind,
    read_anomaly_instruct,
    read_deeppcb,
    read_folder,
    read_manifest,
    read_mmad,
    read_mvtec,
    read_source,
    read_visa,
    read_visa_dr,
)


def test_mvtec_layout_labels_masks_boxes(mvtec_root):
    skips = SkipLog()
    recs = read_mvtec(mvtec_root, skips=skips)
    assert len(skips) == 0
    assert len(recs) == 2 * (3 + 2 + 4)
    train = [r for r in recs if r.split == "train"]
    assert all(r.gt_label == 0 and r.gt_mask is None and r.defect_type is None for r in train)
    bad = [r for r in recs if r.gt_label == 1]
    assert {r.defect_type for r in bad} == {"broken_large", "contamination"}
    assert all(r.gt_mask and r.gt_mask.endswith("_mask.png") for r in bad)
    one = next(
        r
        for r in bad
        if r.category == "bottle" and r.defect_type == "broken_large" and r.image_path.endswith("001.png")
    )
    assert one.gt_boxes == [[11.0, 5.0, 31.0, 20.0]]  # exclusive x2/y2, from the mask
    two = next(r for r in bad if r.defect_type == "contamination")
    assert len(two.gt_boxes) == 2 and two.gt_boxes[0] == [10.0, 5.0, 30.0, 20.0]  # largest first
    assert {r.source for r in recs} == {"mvtec"} and all(r.image_size == (64, 48) for r in recs)
    # filters and a single-category root
    assert len(read_mvtec(mvtec_root, category="carpet", split="test")) == 6
    assert len(read_mvtec(mvtec_root / "bottle")) == 9


def test_btad_ok_ko_and_loco_mask_folders(btad_root, loco_root):
    recs = read_mvtec(btad_root, source="btad")
    ko = [r for r in recs if r.gt_label]
    assert len(recs) == 6 and len(ko) == 2
    assert all(r.gt_mask.endswith(".png") and r.gt_boxes == [[5.0, 5.0, 15.0, 15.0]] for r in ko)
    loco = read_mvtec(loco_root, source="mvtec_loco")
    assert sorted(r.split for r in loco) == ["test", "test", "train", "validation"]
    (anomalous,) = [r for r in loco if r.gt_label]
    assert Path(anomalous.gt_mask).is_dir()  # one folder of masks per image: read as their union
    mask, reason = load_mask(anomalous.gt_mask, (64, 48))
    assert reason is None and mask.sum() == 8 * 8 + 20 * 10
    assert len(anomalous.gt_boxes) == 2


def test_visa_split_csv_and_image_anno(visa_root):
    skips = SkipLog()
    recs = read_visa(visa_root, skips=skips)
    assert len(skips) == 0 and len(recs) == 10
    assert sum(r.gt_label for r in recs) == 4
    candle_bad = [r for r in recs if r.category == "candle" and r.gt_label]
    assert {r.defect_type for r in candle_bad} == {"chunk of wax missing"}
    assert all(
        r.gt_boxes == [[8.0, 8.0, 20.0, 16.0]] for r in candle_bad
    )  # class-index masks (1, 2) read as defect
    assert {r.split for r in recs if r.gt_label == 0} == {"train", "test"}
    assert len(read_visa(visa_root, category="pcb1", split="train")) == 2


def test_deeppcb_fixture_pairs_boxes_splits(deeppcb_root):
    recs = read_deeppcb(deeppcb_root)
    tests = [r for r in recs if r.image_path.endswith("_test.jpg")]
    temps = [r for r in recs if r.image_path.endswith("_temp.jpg")]
    assert len(tests) == 2 and len(temps) == 2
    first = next(r for r in tests if "12000001" in r.image_path)
    assert first.gt_boxes == [[10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0], [5.0, 5.0, 9.0, 9.0]]
    assert first.defect_type == "short" and first.meta["box_types"] == ["open", "short", "short"]
    assert first.reference_path.endswith("12000001_temp.jpg") and first.split == "train"
    pair = [r for r in recs if r.group == first.group]
    assert len(pair) == 2 and {r.gt_label for r in pair} == {0, 1}
    assert next(r for r in tests if "12000002" in r.image_path).split == "test"
    assert read_deeppcb(deeppcb_root, include_templates=False) == tests


def test_llava_json_anomaly_instruct_and_visa_dr(llava_root):
    skips = SkipLog()
    recs = read_anomaly_instruct(llava_root / "instruct.json", skips=skips)
    by_id = {r.meta["id"]: r for r in recs}
    assert set(by_id) == {"a", "b"}
    a, b = by_id["a"], by_id["b"]
    assert a.gt_label == 1 and a.defect_type == "crack" and a.gt_boxes == [[4.0, 4.0, 12.0, 30.0]]
    assert a.meta["conversations"][0] == {"role": "user", "content": "Is there any anomaly in the image?"}
    assert len(a.meta["conversations"]) == 4 and a.split == "train"
    assert b.gt_label == 0 and b.defect_type is None  # label from the yes/no answer
    reasons = dict((Path(p).name if "[" not in p else p.rsplit("[", 1)[1], r) for p, r in skips.items)
    assert any(r.startswith("unlabelled") for r in reasons.values())  # the web image carries no label
    assert any("text-only" in r for r in reasons.values())
    dr = read_visa_dr(llava_root / "instruct.json")
    assert {r.source for r in dr} == {"visa_dr"} and {r.split for r in dr} == {"test"}


def test_mmad_json(mmad_root):
    recs = read_mmad(mmad_root / "mmad.json")
    assert len(recs) == 2
    bad = next(r for r in recs if r.gt_label)
    good = next(r for r in recs if not r.gt_label)
    assert (
        bad.defect_type == "broken_large"
        and bad.category == "bottle"
        and bad.gt_mask.endswith("_rbg_mask.png")
    )
    assert bad.reference_path.endswith("MVTec-AD/bottle/train/good/000.png")
    assert [q["type"] for q in bad.meta["questions"]] == ["Anomaly Detection", "Defect Classification"]
    assert good.defect_type is None and good.meta["dataset"] == "DS-MVTec"


def test_generic_folder_and_manifest(custom_root):
    recs = read_folder(custom_root / "folder")
    assert sorted((r.gt_label, r.defect_type) for r in recs) == [(0, None), (1, "scratch")]
    assert next(r for r in recs if r.gt_label).gt_boxes == [[3.0, 3.0, 20.0, 6.0]]
    man = read_manifest(custom_root / "manifest" / "data.csv")
    assert [(r.gt_label, r.defect_type, r.split) for r in man] == [
        (0, None, "train"),
        (1, "dent", "test"),
        (1, "scratch", "test"),
    ]
    assert man[1].gt_boxes == [[30.0, 20.0, 40.0, 30.0]] and man[2].gt_boxes == [[1.0, 2.0, 10.0, 12.0]]
    assert all(r.category == "widget" for r in man)


def test_detect_kind_and_read_source(mvtec_root, visa_root, deeppcb_root, mmad_root, llava_root, custom_root):
    assert detect_kind(mvtec_root) == "mvtec"
    assert detect_kind(visa_root) == "visa"
    assert detect_kind(deeppcb_root) == "deeppcb"
    assert detect_kind(mmad_root / "mmad.json") == "mmad"
    assert detect_kind(llava_root / "instruct.json") == "anomaly_instruct"
    assert detect_kind(custom_root / "manifest" / "data.csv") == "manifest"
    assert len(read_source(f"visa_dr:{llava_root / 'instruct.json'}")) == 2
    assert len(read_source(str(visa_root))) == 10
    assert len(read_source(f"mmad:{mmad_root / 'mmad.json'}:{mmad_root}")) == 2


def test_record_round_trip():
    rec = Record("x.png", 1, "m.png", [[1, 2, 3, 4]], "crack", "bottle", "mvtec", "test", image_size=(5, 6))
    back = Record.from_dict(rec.to_dict())
    assert back == rec and back.group == "x.png"
    assert set(rec.to_dict()) >= {
        "image_path",
        "gt_label",
        "gt_mask",
        "gt_boxes",
        "defect_type",
        "category",
        "source",
        "split",
        "reference_path",
    }


def test_real_magnetic_tile(real_dev):
    skips = SkipLog()
    recs = read_mvtec(real_dev("magnetic_tile"), source="magnetic_tile", skips=skips)
    assert len(recs) + len(skips) == 300 + 200 + 342
    bad = [r for r in recs if r.gt_label]
    assert len(bad) >= 330 and all(r.gt_mask for r in bad)
    assert {r.defect_type for r in bad} == {"blowhole", "break", "crack", "fray", "uneven"}
    assert sum(bool(r.gt_boxes) for r in bad) >= 0.95 * len(bad)
    for r in bad[:20]:  # boxes lie inside the image
        w, h = r.image_size
        assert all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for b in r.gt_boxes)


def test_real_deeppcb(real_dev):
    skips = SkipLog()
    recs = read_deeppcb(real_dev("deeppcb"), skips=skips)
    tests = [r for r in recs if r.gt_label]
    assert len(tests) == 200 and len(recs) == 400 and len(skips) == 0
    assert all(r.reference_path and r.image_size == (640, 640) for r in tests)
    assert {t for r in tests for t in r.meta["box_types"]} <= set(DEEPPCB_TYPES.values())
    assert all(0 <= b[0] < b[2] <= 640 and 0 <= b[1] < b[3] <= 640 for r in tests for b in r.gt_boxes)
    assert np.mean([len(r.gt_boxes) for r in tests]) > 2


def test_real_elpv_through_the_generic_reader(real_dev):
    """ELPV's labels.csv (image, defect_probability, cell_type) is a generic manifest:
    probability >= 0.5 = defective."""
    skips = SkipLog()
    recs = read_folder(real_dev("elpv"), skips=skips, source="elpv")
    assert len(recs) == 300 and len(skips) == 0
    assert all(r.category == "elpv" and r.gt_boxes == [] for r in recs)
    probs = {r.image_path: float(r.meta.get("label_raw", r.gt_label)) for r in recs}
    assert all((p >= 0.5) == bool(r.gt_label) for r in recs for p in [probs[r.image_path]])
    assert 0 < sum(r.gt_label for r in recs) < 300


def test_llava_turn_tags_are_kept(llava_root, tmp_path):
    """Per-turn tags (VisA-D&R marks low-level / complex questions) reach `meta["conversations"]`."""
    import json

    item = {
        "id": "t",
        "image": str(llava_root / "images" / "bottle" / "test" / "crack" / "000.png"),
        "conversations": [
            {"from": "human", "value": "<image>\nWhy?", "type": "complex"},
            {"from": "gpt", "value": "Heat."},
        ],
        "metadata": {"anomaly": True},
    }
    (llava_root / "tagged.json").write_text(
        json.dumps([item | {"image": "images/bottle/test/crack/000.png"}])
    )
    (rec,) = read_visa_dr(llava_root / "tagged.json")
    assert rec.meta["conversations"][0] == {"role": "user", "content": "Why?", "type": "complex"}
