"""Fixtures for the data-builder tests: small datasets written in the exact published layouts.

MVTec AD / VisA / MMAD cannot be downloaded here, so each fixture recreates the layout (folder names, file
names, CSV headers, JSON keys) with a few real PNG/JPEG files; session-scoped so each is written once.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from data_fixture_files import write_image, write_mask

from anomaly_assistant.data_builders.build import BuildConfig, build


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    """MVTec AD: <cat>/train/good, <cat>/test/{good,<defect>}, <cat>/ground_truth/<defect>/<stem>_mask.png."""
    root = tmp_path_factory.mktemp("mvtec_ad")
    for c, cat in enumerate(("bottle", "carpet")):
        for i in range(3):
            write_image(root / cat / "train" / "good" / f"{i:03d}.png", seed=c * 100 + i)
        for i in range(2):
            write_image(root / cat / "test" / "good" / f"{i:03d}.png", seed=c * 100 + 10 + i)
        for d, defect in enumerate(("broken_large", "contamination")):
            for i in range(2):
                write_image(root / cat / "test" / defect / f"{i:03d}.png", seed=c * 100 + 20 + d * 5 + i)
                write_mask(
                    root / cat / "ground_truth" / defect / f"{i:03d}_mask.png",
                    (64, 48),
                    [(10 + i, 5, 30 + i, 20)] + ([(40, 30, 50, 44)] if d else []),
                )
    (root / "license.txt").write_text("fixture")
    return root


@pytest.fixture(scope="session")
def btad_root(tmp_path_factory) -> Path:
    """BTAD: 01/train/ok, 01/test/{ok,ko}, 01/ground_truth/ko/<stem>.png (no _mask suffix)."""
    root = tmp_path_factory.mktemp("btad")
    for i in range(2):
        write_image(root / "01" / "train" / "ok" / f"{i:04d}.bmp", seed=i, fmt="BMP")
        write_image(root / "01" / "test" / "ok" / f"{i:04d}.bmp", seed=10 + i, fmt="BMP")
        write_image(root / "01" / "test" / "ko" / f"{i:04d}.bmp", seed=20 + i, fmt="BMP")
        write_mask(root / "01" / "ground_truth" / "ko" / f"{i:04d}.png", (64, 48), [(5, 5, 15, 15)])
    return root


@pytest.fixture(scope="session")
def loco_root(tmp_path_factory) -> Path:
    """MVTec LOCO: <cat>/{train,validation}/good, test/<defect>/<stem>.png,
    ground_truth/<defect>/<stem>/000.png, 001.png."""
    root = tmp_path_factory.mktemp("mvtec_loco")
    cat = root / "juice_bottle"
    write_image(cat / "train" / "good" / "000.png", seed=1)
    write_image(cat / "validation" / "good" / "000.png", seed=2)
    write_image(cat / "test" / "good" / "000.png", seed=3)
    write_image(cat / "test" / "logical_anomalies" / "000.png", seed=4)
    write_mask(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", (64, 48), [(2, 2, 10, 10)])
    write_mask(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", (64, 48), [(40, 30, 60, 40)])
    return root


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory) -> Path:
    """VisA: split_csv/1cls.csv, <cat>/image_anno.csv, <cat>/Data/Images/{Normal,Anomaly},
    <cat>/Data/Masks/Anomaly."""
    root = tmp_path_factory.mktemp("visa")
    rows = [("object", "split", "label", "image", "mask")]
    anno = [("image", "label", "mask")]
    for cat in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            write_image(root / rel, seed=i, fmt="JPEG")
            rows.append((cat, "train" if i < 2 else "test", "normal", rel, ""))
            anno.append((rel, "normal", ""))
        for i in range(2):
            rel, mrel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            write_image(root / rel, seed=50 + i, fmt="JPEG")
            write_mask(root / mrel, (64, 48), [(8, 8, 20, 16)], value=i + 1)  # VisA masks hold class indices
            rows.append((cat, "test", "anomaly", rel, mrel))
            anno.append((rel, "chunk of wax missing" if cat == "candle" else "bent", mrel))
        with open(root / cat / "image_anno.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([a for a in anno if a[0] == "image" or a[0].startswith(cat + "/")])
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


@pytest.fixture(scope="session")
def deeppcb_root(tmp_path_factory) -> Path:
    """DeepPCB: PCBData/group12000/12000/<id>_test.jpg + _temp.jpg, group12000/12000_not/<id>.txt,
    test.txt."""
    root = tmp_path_factory.mktemp("deeppcb")
    base = root / "PCBData" / "group12000"
    for i, pid in enumerate(("12000001", "12000002")):
        write_image(base / "12000" / f"{pid}_test.jpg", (128, 128), seed=i, fmt="JPEG")
        write_image(base / "12000" / f"{pid}_temp.jpg", (128, 128), seed=10 + i, fmt="JPEG")
    (base / "12000_not").mkdir(parents=True)
    (base / "12000_not" / "12000001.txt").write_text("10 20 30 40 1\n50,60,70,80,2\n5 5 9 9 2\n")
    (base / "12000_not" / "12000002.txt").write_text("1 2 3 4 6\n")
    (root / "PCBData" / "test.txt").write_text(
        "group12000/12000/12000002.jpg group12000/12000_not/12000002.txt\n"
    )
    (root / "PCBData" / "trainval.txt").write_text(
        "group12000/12000/12000001.jpg group12000/12000_not/12000001.txt\n"
    )
    return root


@pytest.fixture(scope="session")
def llava_root(tmp_path_factory) -> Path:
    """Anomaly-Instruct-125k / VisA-D&R style LLaVA JSON next to its images."""
    root = tmp_path_factory.mktemp("llava")
    write_image(root / "images" / "bottle" / "test" / "crack" / "000.png", seed=1)
    write_mask(root / "masks" / "000_mask.png", (64, 48), [(4, 4, 12, 30)])
    write_image(root / "images" / "bottle" / "test" / "good" / "001.png", seed=2)
    write_image(root / "images" / "web" / "x.png", seed=3)
    items = [
        {
            "id": "a",
            "image": "images/bottle/test/crack/000.png",
            "conversations": [
                {"from": "human", "value": "<image>\nIs there any anomaly in the image?"},
                {"from": "gpt", "value": "Yes, there is a crack near the rim."},
                {"from": "human", "value": "What could cause it?"},
                {"from": "gpt", "value": "Thermal shock."},
            ],
            "metadata": {"anomaly": True, "mask": "masks/000_mask.png", "category": "industrial"},
        },
        {
            "id": "b",
            "image": "images/bottle/test/good/001.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nAre there any defects for the object in the image? "
                    "Please reply with 'Yes' or 'No'.",
                },
                {"from": "gpt", "value": "No"},
            ],
        },
        {
            "id": "c",
            "image": "images/web/x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A thing."},
            ],
        },
        {
            "id": "d",
            "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}],
        },
    ]
    (root / "instruct.json").write_text(json.dumps(items))
    return root


@pytest.fixture(scope="session")
def mmad_root(tmp_path_factory) -> Path:
    """MMAD: mmad.json keyed by image path (DS-MVTec/<cat>/image/<defect>/<file>) with MCQ conversation."""
    root = tmp_path_factory.mktemp("mmad")
    write_image(root / "DS-MVTec" / "bottle" / "image" / "broken_large" / "000.png", seed=1)
    write_mask(
        root / "DS-MVTec" / "bottle" / "rbg_mask" / "broken_large" / "000_rbg_mask.png",
        (64, 48),
        [(1, 1, 9, 9)],
    )
    write_image(root / "DS-MVTec" / "bottle" / "image" / "good" / "001.png", seed=2)
    write_image(root / "MVTec-AD" / "bottle" / "train" / "good" / "000.png", seed=3)
    def q(ans):
        return [
            {
                "type": "Anomaly Detection",
                "Question": "Is there any defect in the object?",
                "Options": {"A": "Yes.", "B": "No."},
                "Answer": ans,
                "annotation": True,
            },
            {
                "type": "Defect Classification",
                "Question": "What is the type of the defect?",
                "Options": {"A": "Broken.", "B": "Contamination."},
                "Answer": "A",
                "annotation": True,
            },
        ]

    data = {
        "DS-MVTec/bottle/image/broken_large/000.png": {
            "image_path": "DS-MVTec/bottle/image/broken_large/000.png",
            "mask_path": "DS-MVTec/bottle/rbg_mask/broken_large/000_rbg_mask.png",
            "similar_templates": ["MVTec-AD/bottle/train/good/000.png"],
            "random_templates": [],
            "conversation": q("A"),
        },
        "DS-MVTec/bottle/image/good/001.png": {
            "image_path": "DS-MVTec/bottle/image/good/001.png",
            "mask_path": None,
            "similar_templates": ["MVTec-AD/bottle/train/good/000.png"],
            "random_templates": [],
            "conversation": q("B")[:1],
        },
    }
    (root / "mmad.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def custom_root(tmp_path_factory) -> Path:
    """A user's folder: good/, scratch/ (+ masks/scratch/), and a manifest.csv in a second folder."""
    root = tmp_path_factory.mktemp("custom")
    folder = root / "folder"
    write_image(folder / "good" / "a.png", seed=1)
    write_image(folder / "scratch" / "b.png", seed=2)
    write_mask(folder / "masks" / "scratch" / "b.png", (64, 48), [(3, 3, 20, 6)])
    man = root / "manifest"
    write_image(man / "img" / "1.png", seed=3)
    write_image(man / "img" / "2.png", seed=4)
    write_mask(man / "img" / "2_mask.png", (64, 48), [(30, 20, 40, 30)])
    write_image(man / "img" / "3.png", seed=5)
    with open(man / "data.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ("image", "label", "mask", "boxes", "defect_type", "category", "split"),
                ("img/1.png", "good", "", "", "", "widget", "train"),
                ("img/2.png", "1", "img/2_mask.png", "", "dent", "widget", "test"),
                ("img/3.png", "anomalous", "", "[[1, 2, 10, 12]]", "scratch", "widget", "test"),
            ]
        )
    return root


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny offline backbones (model, processor) per family, built once."""
    from anomaly_assistant.tiny import build_tiny

    return {fam: build_tiny(fam) for fam in ("qwen2_5_vl", "llava_onevision", "llava")}


@pytest.fixture(scope="session")
def built(tmp_path_factory, mvtec_root, deeppcb_root):
    out = tmp_path_factory.mktemp("built")
    cfg = BuildConfig(
        sources=[str(mvtec_root), str(deeppcb_root)],
        out=str(out),
        synth=18,
        synth_size=96,
        defects=6,
        textures=4,
        progress=False,
        seed=1,
    )
    return build(cfg), out
