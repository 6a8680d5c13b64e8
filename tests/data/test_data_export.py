"""Leak-free splits, the SFT / GRPO / expert datasets, the dataset card and the end-to-end build."""

from __future__ import annotations

import json
import random

import pytest

from anomaly_assistant.data_builders.export import read_records_jsonl, split_records
from anomaly_assistant.data_builders.records import Record
from anomaly_assistant.finding import Frame
from anomaly_assistant.grammar import parse_answer
from anomaly_assistant.prompts import INSPECTION_PROMPT


def test_split_by_group_never_leaks_and_is_order_free():
    recs = [Record(f"img{i}.png", i % 2, group=f"g{i // 3}") for i in range(60)]
    a = split_records(recs, (0.6, 0.2, 0.2), seed=4)
    groups = {sp: {r.group for r in rs} for sp, rs in a.items()}
    assert not (groups["train"] & groups["validation"]) and not (groups["train"] & groups["test"])
    assert not (groups["validation"] & groups["test"])
    assert all(a.values()) and sum(len(v) for v in a.values()) == 60
    shuffled = [Record(r.image_path, r.gt_label, group=r.group) for r in recs]
    random.Random(0).shuffle(shuffled)
    b = split_records(shuffled, (0.6, 0.2, 0.2), seed=4)
    assert {sp: sorted(r.image_path for r in rs) for sp, rs in a.items()} == {
        sp: sorted(r.image_path for r in rs) for sp, rs in b.items()
    }
    with pytest.raises(ValueError):
        split_records(recs, (0.5, 0.2, 0.2))


def test_build_outputs_and_no_source_image_in_two_splits(built):
    result, out = built
    where: dict[str, str] = {}
    for sp, recs in result.splits.items():
        for r in recs:
            assert where.setdefault(r.group, sp) == sp
    derived = [r for recs in result.splits.values() for r in recs if r.source.endswith("+defects")]
    assert len(derived) == 6
    originals = {r.image_path: sp for sp, recs in result.splits.items() for r in recs}
    for sp, recs in result.splits.items():
        for r in recs:
            if r.source.endswith("+defects") and r.meta["original"] in originals:
                assert originals[r.meta["original"]] == sp
    pcb = [r for recs in result.splits.values() for r in recs if r.source == "deeppcb"]
    assert len({where[r.group] for r in pcb if r.group == pcb[0].group}) == 1
    for name in ("sft", "grpo", "expert", "records", "README.md", "summary.json", "anomaly_instruct.json"):
        assert (out / name).exists(), name
    recs = read_records_jsonl(out / "records" / "train.jsonl")
    assert [r.image_path for r in recs] == [r.image_path for r in result.splits["train"]]


def test_sft_grpo_expert_datasets(built):
    import datasets

    result, out = built
    sft = datasets.load_from_disk(str(out / "sft"))
    grpo = datasets.load_from_disk(str(out / "grpo"))
    expert = datasets.load_from_disk(str(out / "expert"))
    assert set(sft) == set(grpo) == set(expert) == {"train", "validation", "test"}
    n_train = len(result.splits["train"])
    assert len(expert["train"]) == n_train and len(grpo["train"]) == n_train
    assert len(sft["train"]) == 4 * n_train
    row = sft["train"][0]
    assert len(row["images"]) == 1 and row["images"][0].mode in ("RGB", "L", "P")
    assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant"
    for g in grpo["train"]:
        frame = Frame.from_json(json.loads(g["frame"]))
        parsed = parse_answer(g["answer"])
        assert parsed.ok and parsed.verdict == g["verdict"]
        assert [b.as_list() for b in parsed.boxes] == g["solution_boxes"]
        assert g["image"].size == frame.original_size
        assert g["prompt"] == [{"role": "user", "content": INSPECTION_PROMPT}]
        assert (g["defect_type"] is None) == (g["gt_label"] == 0)
    bad = [e for e in expert["train"] if e["gt_label"] == 1 and e["mask"] is not None]
    assert bad and all(e["mask"].size == e["image"].size for e in bad)
    assert all(e["mask"] is None for e in expert["train"] if e["gt_label"] == 0)


def test_dataset_card_counts(built):
    result, out = built
    card = (out / "README.md").read_text()
    n = {sp: len(r) for sp, r in result.splits.items()}
    for sp, k in n.items():
        n1 = sum(r.gt_label for r in result.splits[sp])
        assert f"| {sp} | {k} | {k - n1} | {n1} |" in card
    assert "## Category" in card and "## Defect type" in card and "| bottle |" in card and "| nut |" in card
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["images"] == n["train"]
    assert "train" in result.summary_table()


def test_build_is_deterministic_and_follows_a_saved_processor(tmp_path, tiny_models):
    """Same config -> same records and targets; `--processor DIR` puts boxes in that processor's frame."""
    from anomaly_assistant import backbones
    from anomaly_assistant.data_builders.build import BuildConfig, build

    _, processor = tiny_models["qwen2_5_vl"]
    processor.save_pretrained(tmp_path / "proc")
    runs = []
    for name in ("a", "b"):
        cfg = BuildConfig(
            synth=9,
            synth_size=320,
            textures=2,
            out=str(tmp_path / name),
            seed=5,
            kinds=["inspect"],
            progress=False,
            processor=str(tmp_path / "proc"),
        )
        runs.append(build(cfg))
    a, b = runs
    for sp in a.splits:
        assert [(r.gt_label, r.defect_type, r.gt_boxes) for r in a.splits[sp]] == [
            (r.gt_label, r.defect_type, r.gt_boxes) for r in b.splits[sp]
        ]
        assert [s.answer for s in a.samples[sp]] == [s.answer for s in b.samples[sp]]
    sample = next(s for ss in a.samples.values() for s in ss)
    expected = backbones.get("qwen2_5_vl").input_frame(processor, (320, 320))
    assert sample.frame == expected and max(expected.input_size) <= 224  # the tiny 224x224 pixel budget


def test_expert_rows_loco_mask_union_and_path_mode(loco_root):
    import numpy as np

    from anomaly_assistant.data_builders.export import expert_dataset
    from anomaly_assistant.data_builders.sources import read_mvtec

    recs = read_mvtec(loco_root)
    for embed in (True, False):
        ds = expert_dataset(recs, embed=embed)
        row = next(r for r in ds if r["gt_label"] == 1)
        mask = np.asarray(row["mask"]) > 0
        assert mask.shape == (48, 64) and mask.sum() == 8 * 8 + 20 * 10  # the union of the two LOCO masks
        assert row["image"].size == (64, 48)
    raw = expert_dataset(recs, embed=False).cast_column("image", __import__("datasets").Image(decode=False))
    assert all(v["bytes"] is None and v["path"].startswith("/") for v in raw["image"])
