"""AD metrics of the expert or of the whole assistant on an MVTec-layout category.

`ROOT/CAT/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}`: the k references are the first
k images of `train/good` in sorted order; every `test/` image is scored. Expert-only runs go through
`AnomalyAssistant.expert_only(...).screen(...)`; full models through `inspect_batch` (the score and map of
the Finding the assistant returns). Outputs: image AUROC / AP, pixel AUROC and PRO (threshold-free), and
accuracy / precision / recall / F1 of the verdict (the operating threshold).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_assistant import scoring
from anomaly_assistant.eval import distributed, metrics
from anomaly_assistant.eval import report as R
from anomaly_assistant.localize import DEFAULT_THRESHOLD, boxes_from_map


def reference_paths(root: str | Path, category: str, k: int, seed: int | None = None) -> list[str]:
    """The few-shot references: k images of `ROOT/CAT/train/good`.

    Without a seed, the first k in sorted order; with one, k of them drawn at random (few-shot figures move
    with the draw; report several seeds, as few-shot papers do).
    """
    if k <= 0:
        return []
    from anomaly_assistant.data_builders.sources import read_mvtec

    recs = read_mvtec(root, category=category, split="train")
    good = sorted(r.image_path for r in recs if r.gt_label == 0)
    if len(good) < k:
        raise ValueError(f"{root}/{category}/train/good has {len(good)} images, {k} references asked")
    if seed is None:
        return good[:k]
    picks = np.random.default_rng(seed).choice(len(good), size=k, replace=False)
    return [good[i] for i in sorted(picks)]


def test_records(root: str | Path, category: str) -> list[Any]:
    """Every `test/` image of the category as `Record`s (masks attached where they exist)."""
    from anomaly_assistant.data_builders.sources import read_mvtec

    recs = read_mvtec(root, category=category, split="test", with_boxes=False)
    if not recs:
        raise ValueError(f"no test images under {root}/{category}/test")
    return recs


def _prediction(rec: Any, finding: Any) -> dict[str, Any]:
    amap = finding.anomaly_map
    score = finding.score if finding.score is not None else float(finding.pred_label)
    return {
        "image_path": rec.image_path, "gt_label": int(rec.gt_label), "defect_type": rec.defect_type,
        "category": rec.category, "score": float(score), "pred_label": int(finding.pred_label),
        "anomaly_map": None if amap is None else np.asarray(amap, dtype=np.float32),
        "pred_boxes": [b.as_list() for b in finding.boxes],
    }


def predict(assistant: Any, records: Sequence[Any], references: Sequence[str], batch_size: int = 8,
            expert_only: bool = False, max_new_tokens: int = 256) -> list[dict[str, Any]]:
    """One prediction dict per record (score, verdict, map), spread over the launched processes."""
    refs = list(references) or None
    use_expert = expert_only or not assistant.has_llm
    # The references are fitted once per process; every batch is screened against the same bank.
    screener = assistant.reference_screener(refs) if use_expert and refs else None

    def run(batch: list[Any]) -> list[dict[str, Any]]:
        images = [r.image_path for r in batch]
        if use_expert:
            findings = assistant.screen(images, screener=screener)
        else:
            findings = assistant.inspect_batch(images, references=refs, max_new_tokens=max_new_tokens)
        return [_prediction(r, f) for r, f in zip(batch, findings)]

    return distributed.distributed_map(run, list(records), batch_size=batch_size, progress="scoring")


def _mask_for(rec_mask: str | None, shape: tuple[int, int]) -> np.ndarray:
    if not rec_mask:
        return np.zeros(shape, dtype=bool)
    from anomaly_assistant.data_builders.records import load_mask

    mask, reason = load_mask(rec_mask)
    if mask is None:
        raise ValueError(f"{rec_mask}: {reason}")
    if mask.shape != shape:
        raise ValueError(f"{rec_mask}: mask {mask.shape} vs anomaly map {shape}")
    return mask


def gt_masks(records: Sequence[Any], predictions: Sequence[dict[str, Any]]) -> list[np.ndarray] | None:
    """Boolean masks at the maps' resolution (normal images: all False); None without maps or masks."""
    if not any(r.gt_mask for r in records) or any(p["anomaly_map"] is None for p in predictions):
        return None
    return [_mask_for(r.gt_mask, p["anomaly_map"].shape) for r, p in zip(records, predictions)]


def compute(
    records: Sequence[Any], predictions: Sequence[dict[str, Any]], max_fpr: float = 0.3
) -> dict[str, Any]:
    """The result dict (stable keys first, details after)."""
    y = [p["gt_label"] for p in predictions]
    s = [p["score"] for p in predictions]
    masks = gt_masks(records, predictions)
    maps = [p["anomaly_map"] for p in predictions]
    out: dict[str, Any] = {
        "image_auroc": metrics.image_auroc(y, s),
        "image_ap": metrics.image_ap(y, s),
        "pixel_auroc": metrics.pixel_auroc(masks, maps) if masks else None,
        "pro": metrics.pro_score(masks, maps, max_fpr=max_fpr) if masks else None,
        "n_images": len(predictions),
        "n_masks": sum(1 for r in records if r.gt_mask) if masks else 0,
    }
    at = scoring.binary_metrics(y, [p["pred_label"] for p in predictions])
    out["at_threshold"] = {
        k: at[k] for k in (*scoring.BINARY_KEYS, "tp", "fp", "tn", "fn")
    }
    per_defect = {}
    normals = [p for p in predictions if p["gt_label"] == 0]
    for d in sorted({p["defect_type"] for p in predictions if p["gt_label"] == 1}):
        sub = normals + [p for p in predictions if p["defect_type"] == d]
        per_defect[d] = {
            "image_auroc": metrics.image_auroc([p["gt_label"] for p in sub], [p["score"] for p in sub]),
            "recall": float(np.mean([p["pred_label"] for p in sub if p["gt_label"] == 1])),
            "n": sum(p["gt_label"] for p in sub),
        }
    out["per_defect"] = per_defect
    out["n_normal"] = len(normals)
    out["n_anomalous"] = len(predictions) - len(normals)
    out["pro_max_fpr"] = max_fpr
    return out


def evaluate(assistant: Any, root: str | Path, category: str, shots: int, batch_size: int = 8,
             expert_only: bool = False, limit: int | None = None, max_new_tokens: int = 256,
             reference_seed: int | None = None) -> tuple[dict[str, Any], list[Any], list[dict]]:
    """Score every test image of ROOT/CATEGORY; returns (result, records, predictions) on every process."""
    t0 = time.perf_counter()
    refs = reference_paths(root, category, shots, reference_seed)
    records = test_records(root, category)
    if limit:
        records = _spread(records, limit)
    preds = predict(assistant, records, refs, batch_size=batch_size, expert_only=expert_only,
                    max_new_tokens=max_new_tokens)
    result = compute(records, preds)
    result["seconds"] = time.perf_counter() - t0
    result.update({"category": category, "shots": shots, "reference_seed": reference_seed, "references": refs,
                   "threshold": assistant.threshold})
    return result, records, preds


def _spread(records: Sequence[Any], limit: int) -> list[Any]:
    """`limit` records taken evenly over the sorted list (keeps every defect type represented)."""
    if limit >= len(records):
        return list(records)
    idx = np.linspace(0, len(records) - 1, limit).round().astype(int)
    return [records[i] for i in sorted(set(idx.tolist()))]


def example_rows(records: Sequence[Any], preds: Sequence[dict[str, Any]], n: int = 8) -> list[dict[str, Any]]:
    """Examples for the heatmap grid: the most and least confident anomalies, a false alarm, a normal."""
    order = np.argsort([-p["score"] for p in preds])
    anomalous = [i for i in order if preds[i]["gt_label"] == 1]
    normal = [i for i in order if preds[i]["gt_label"] == 0]
    candidates = anomalous[: n - 4] + anomalous[::-1][:2] + normal[:1] + normal[::-1][:1]
    picks = list(dict.fromkeys(int(i) for i in candidates))[:n]
    rows = []
    for i in picks:
        rec, p = records[i], preds[i]
        mask = None
        if rec.gt_mask and p["anomaly_map"] is not None:
            mask = _mask_for(rec.gt_mask, p["anomaly_map"].shape)
        gt_boxes = rec.gt_boxes
        if not gt_boxes and mask is not None:
            gt_boxes = [b.as_list() for b in boxes_from_map(mask)]
        rows.append({
            "image_path": rec.image_path, "anomaly_map": p["anomaly_map"], "gt_mask": mask,
            "gt_boxes": gt_boxes, "pred_boxes": p["pred_boxes"], "score": p["score"],
            "verdict": "anomalous" if p["pred_label"] else "normal",
            "title": f"{rec.defect_type or 'good'} · {Path(rec.image_path).name}",
        })
    return rows


def write_report(result: dict[str, Any], records: Sequence[Any], preds: Sequence[dict[str, Any]],
                 out_json: str | Path, title: str) -> tuple[Path, Path]:
    """Markdown + HTML report of an AD run.

    Metric tables, image ROC (all and per defect), PRO curve, per-defect bars and heatmaps.
    """
    rep = R.Report(title, Path(out_json))
    rep.heading("Summary")
    rep.table([{k: result.get(k) for k in ("image_auroc", "image_ap", "pixel_auroc", "pro", "n_images",
                                            "n_masks", "seconds")}])
    rep.text(f"Category `{result.get('category')}`, {result.get('shots')} reference image(s), "
             f"mode: {result.get('mode', '')}. PRO is the normalised area under the per-region-overlap curve "
             f"for FPR ≤ {result.get('pro_max_fpr', 0.3)}.")
    at = f" {result['threshold']:g}" if result.get("threshold") is not None else ""
    rep.heading(f"At the operating threshold{at} (the verdict)")
    rep.table([result["at_threshold"]])
    rep.heading("Per defect type (normal test images vs that defect)")
    rep.table([{"defect": d, **v} for d, v in result["per_defect"].items()])
    y = [p["gt_label"] for p in preds]
    s = [p["score"] for p in preds]
    curves = {"all": (*_roc(y, s), result["image_auroc"])} if result["image_auroc"] is not None else {}
    for d, v in result["per_defect"].items():
        sub = [p for p in preds if p["gt_label"] == 0 or p["defect_type"] == d]
        pts = metrics.roc_points([p["gt_label"] for p in sub], [p["score"] for p in sub])
        if pts is not None:
            curves[d] = (*pts, v["image_auroc"])
    rep.heading("Figures")
    rep.figure(R.plot_roc(curves, rep.figure_path("roc.png"), title="image-level ROC"),
               "Image-level ROC, all defects and per defect type")
    masks = gt_masks(records, preds)
    if masks:
        curve = metrics.pro_curve(masks, [p["anomaly_map"] for p in preds])
        if curve is not None:
            rep.figure(R.plot_curve(curve[0], curve[1], rep.figure_path("pro.png"), "false positive rate",
                                    "per-region overlap", f"PRO {R.fmt(result['pro'])}",
                                    x_max=result["pro_max_fpr"]),
                       "PRO curve; the shaded area up to the FPR limit, normalised, is the PRO score")
    rep.figure(R.plot_bars(result["per_defect"], ["image_auroc", "recall"], rep.figure_path("per_defect.png"),
                           title="per defect type"),
               "Image AUROC and recall at the threshold per defect type")
    rep.figure(R.plot_heatmap_grid(example_rows(records, preds), rep.figure_path("examples.png"),
                                   threshold=result.get("threshold", DEFAULT_THRESHOLD)),
               "Examples: image with ground-truth mask/boxes (green); "
               "anomaly map (0–1) with predicted boxes (red)")
    return rep.save()


def _roc(y: Sequence[int], s: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pts = metrics.roc_points(y, s)
    return pts if pts is not None else (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
