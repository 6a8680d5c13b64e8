"""Bad input never crashes a read or a build: each file is skipped, reported with its path and reason, and
counted."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from data_fixture_files import write_image, write_mask

from anomaly_assistant.data_builders.build import BuildConfig, build
from anomaly_assistant.data_builders.records import SkipLog, validate_records
from anomaly_assistant.data_builders.sources import read_manifest, read_mvtec, read_visa


@pytest.fixture(scope="module")
def broken_mvtec(tmp_path_factory, mvtec_root):
    """A copy of the MVTec fixture with a 0-byte image, a truncated PNG, a text file named .png and a
    wrong-size mask."""
    root = tmp_path_factory.mktemp("broken_mvtec")
    shutil.copytree(mvtec_root / "bottle", root / "bottle")
    (root / "bottle" / "train" / "good" / "zero.png").write_bytes(b"")
    good = (root / "bottle" / "train" / "good" / "000.png").read_bytes()
    (root / "bottle" / "train" / "good" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "bottle" / "test" / "good" / "notes.png").write_text("not an image")
    write_image(root / "bottle" / "test" / "broken_large" / "009.png", seed=9)
    write_mask(root / "bottle" / "ground_truth" / "broken_large" / "009_mask.png", (32, 32), [(1, 1, 5, 5)])
    return root


def test_mvtec_bad_files_are_logged_not_raised(broken_mvtec):
    skips = SkipLog()
    recs = read_mvtec(broken_mvtec, skips=skips)
    reasons = {p.rsplit("/", 1)[1]: r for p, r in skips.items}
    assert reasons["zero.png"].startswith("empty file")
    assert reasons["notes.png"].startswith("unreadable image")
    assert reasons["009_mask.png"].startswith("mask size mismatch: mask 32x32 vs image 64x48")
    assert not any(r.image_path.endswith(("zero.png", "notes.png", "009.png")) for r in recs)
    # the truncated PNG has a valid header: the full decode at build time catches it
    assert any(r.image_path.endswith("truncated.png") for r in recs)
    kept = validate_records(recs, skips)
    assert not any(r.image_path.endswith("truncated.png") for r in kept)
    assert any(p.endswith("truncated.png") and r.startswith("unreadable image") for p, r in skips.items)
    assert len(kept) == 9 and len(skips) == 4
    assert skips.reasons() == {"empty file": 1, "unreadable image": 2, "mask size mismatch": 1}


def test_manifest_missing_files_escapes_and_bad_rows(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "ok.png")
    write_image(tmp_path / "outside.png")
    write_image(root / "m.png")
    write_mask(root / "m_mask.png", (10, 10), [(0, 0, 2, 2)])
    with open(root / "data.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ("image", "label", "mask", "boxes"),
                ("ok.png", "0", "", ""),
                ("missing.png", "1", "", ""),
                ("../outside.png", "0", "", ""),
                (str(tmp_path / "outside.png"), "0", "", ""),
                ("ok.png", "maybe", "", ""),
                ("ok.png", "1", "", "[[1, 2, 3]]"),
                ("m.png", "1", "m_mask.png", ""),
                ("ok.png", "1", "../outside.png", ""),
            ]
        )
    skips = SkipLog()
    recs = read_manifest(root / "data.csv", skips=skips)
    assert [r.image_path.rsplit("/", 1)[1] for r in recs] == ["ok.png"]
    kinds = [r.split(":")[0] for _, r in skips.items]
    assert kinds == [
        "missing file",
        "path escapes dataset root",
        "path escapes dataset root",
        "bad manifest row",
        "bad manifest row",
        "mask size mismatch",
        "path escapes dataset root",
    ]
    assert any(p.endswith("missing.png") for p, _ in skips.items)


def test_visa_csv_with_missing_and_escaping_rows(tmp_path, visa_root):
    root = tmp_path / "visa"
    shutil.copytree(visa_root, root)
    with open(root / "split_csv" / "1cls.csv", "a", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ("candle", "test", "normal", "candle/Data/Images/Normal/9999.JPG", ""),
                ("candle", "test", "normal", "../../etc/passwd", ""),
            ]
        )
    skips = SkipLog()
    recs = read_visa(root, skips=skips)
    assert len(recs) == 10
    assert [r.split(":")[0] for _, r in skips.items] == ["missing file", "path escapes dataset root"]


def test_build_reports_skips_in_summary(tmp_path, broken_mvtec):
    cfg = BuildConfig(
        sources=[str(broken_mvtec), str(tmp_path / "does_not_exist")],
        out=str(tmp_path / "out"),
        kinds=["inspect"],
        progress=False,
    )
    result = build(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_counts"] == {
        "empty file": 1,
        "unreadable image": 2,
        "mask size mismatch": 1,
        "missing file": 1,
    }
    assert {s["path"].rsplit("/", 1)[1] for s in summary["skipped"]} >= {
        "zero.png",
        "truncated.png",
        "notes.png",
    }
    assert sum(len(v) for v in result.splits.values()) == 9
    card = (tmp_path / "out" / "README.md").read_text()
    assert "skipped 5 item(s)" in card and "truncated.png" in card
    assert "skipped 5 item(s)" in result.summary_table()
