"""AD evaluation on an MVTec-layout folder with known maps, and the Markdown/HTML reports it writes."""

import json

import numpy as np
import pytest
from PIL import Image

from anomaly_assistant.data_builders.records import load_mask
from anomaly_assistant.eval import ad
from anomaly_assistant.eval import report as R


def _oracle_predictions(records, noise=0.0, seed=0):
    """Maps equal to the ground truth (plus noise); score = map maximum; verdict at 0.5."""
    rng = np.random.default_rng(seed)
    preds = []
    for r in records:
        with Image.open(r.image_path) as im:
            w, h = im.size
        m = load_mask(r.gt_mask)[0].astype(np.float32) if r.gt_mask else np.zeros((h, w), np.float32)
        amap = np.clip(m * 0.8 + noise * rng.random(m.shape).astype(np.float32), 0, 1)
        score = float(amap.max())
        preds.append({"image_path": r.image_path, "gt_label": r.gt_label, "defect_type": r.defect_type,
                      "category": r.category, "score": score, "pred_label": int(score >= 0.5),
                      "anomaly_map": amap, "pred_boxes": [[10, 10, 40, 30]] if score >= 0.5 else []})
    return preds


def test_references_are_first_k_sorted(mvtec_root):
    refs = ad.reference_paths(mvtec_root, "brick", 3)
    assert [p.rsplit("/", 1)[1] for p in refs] == ["000.png", "001.png", "002.png"]
    assert ad.reference_paths(mvtec_root, "brick", 0) == []
    with pytest.raises(ValueError):
        ad.reference_paths(mvtec_root, "brick", 50)


def test_seeded_reference_draws_are_reproducible_distinct_and_from_train_good(mvtec_root):
    first = ad.reference_paths(mvtec_root, "brick", 3)
    pool = ad.reference_paths(mvtec_root, "brick", 5)  # all of train/good
    draws = [ad.reference_paths(mvtec_root, "brick", 3, seed=s) for s in range(6)]
    assert draws[0] == ad.reference_paths(mvtec_root, "brick", 3, seed=0)  # same seed, same references
    for d in draws:
        assert len(set(d)) == 3 and set(d) <= set(pool) and d == sorted(d)
    assert len({tuple(d) for d in draws}) > 1 and any(d != first for d in draws)
    with pytest.raises(ValueError):
        ad.reference_paths(mvtec_root, "brick", 6, seed=0)


def test_perfect_maps_score_one_and_keys_are_stable(mvtec_root):
    recs = ad.test_records(mvtec_root, "brick")
    assert sum(r.gt_label for r in recs) == 4 and len(recs) == 8
    res = ad.compute(recs, _oracle_predictions(recs))
    for k in ("image_auroc", "image_ap", "pixel_auroc", "pro", "n_images", "n_masks"):
        assert k in res
    assert res["image_auroc"] == 1.0 and res["image_ap"] == 1.0
    assert res["pixel_auroc"] == 1.0 and res["pro"] == pytest.approx(1.0)
    assert (res["n_images"], res["n_masks"]) == (8, 4)
    assert res["at_threshold"]["accuracy"] == 1.0 and res["per_defect"]["scratch"]["image_auroc"] == 1.0


def test_noisy_maps_lower_pixel_metrics_and_no_maps_gives_null_pixel_keys(mvtec_root):
    recs = ad.test_records(mvtec_root, "brick")
    noisy = ad.compute(recs, _oracle_predictions(recs, noise=0.9))
    assert noisy["pixel_auroc"] < 1.0 and noisy["pro"] < 1.0
    no_maps = [dict(p, anomaly_map=None) for p in _oracle_predictions(recs)]
    res = ad.compute(recs, no_maps)
    assert res["pixel_auroc"] is None and res["pro"] is None and res["n_masks"] == 0
    assert res["image_auroc"] == 1.0


def test_report_renders_tables_and_figures(mvtec_root, tmp_path):
    recs = ad.test_records(mvtec_root, "brick")
    preds = _oracle_predictions(recs, noise=0.3)
    res = ad.compute(recs, preds)
    res.update(seconds=1.5, category="brick", shots=2, mode="expert-only (test)")
    md, html = ad.write_report(res, recs, preds, tmp_path / "res.json", "AD test")
    text = md.read_text()
    assert "| image_auroc | image_ap | pixel_auroc | pro | n_images | n_masks | seconds |" in text
    assert f"| {R.fmt(res['image_auroc'])} |" in text and "scratch" in text
    figs = sorted(p.name for p in (tmp_path / "res_figures").glob("*.png"))
    assert figs == ["examples.png", "per_defect.png", "pro.png", "roc.png"]
    for name in figs:
        with Image.open(tmp_path / "res_figures" / name) as im:
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape[0] > 200 and arr.std() > 10  # a drawn figure, not a blank canvas
    page = html.read_text()
    assert page.count("<img ") == 4 and "res_figures/examples.png" in page and "<table>" in page


def test_heatmap_grid_draws_the_map_where_it_is_hot(tmp_path):
    img = tmp_path / "g.png"
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(img)
    amap = np.zeros((60, 80), np.float32)
    amap[:, 40:] = 1.0
    panel = {
        "image_path": str(img),
        "anomaly_map": amap,
        "gt_boxes": [[5, 5, 20, 20]],
        "pred_boxes": [[45, 10, 70, 50]],
        "title": "t",
    }
    out = R.plot_heatmap_grid([panel], tmp_path / "grid.png", cols=1)
    arr = np.asarray(Image.open(out).convert("RGB")).astype(int)
    red = (arr[..., 0] > 150) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    green = (arr[..., 1] > 150) & (arr[..., 0] < 100) & (arr[..., 2] < 100)
    assert red.sum() > 50 and green.sum() > 20  # jet's hot half / predicted box, ground-truth box


def test_report_formats_numbers_and_nulls(tmp_path):
    rep = R.Report("t", tmp_path / "x.json")
    rep.table([{"a": 0.12345, "b": None, "c": 3}])
    md = rep.to_markdown()
    assert "| 0.123 | — | 3 |" in md
    md_path, html_path = rep.save()
    assert md_path.name == "x.md" and html_path.name == "x.html"
    assert json.dumps(R.report_paths("d/x.json")[2].name) == '"x_figures"'
