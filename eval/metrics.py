"""Anomaly-detection expert metrics: image AUROC / AP, pixel AUROC, PRO.

Threshold-free metrics come from scikit-learn (`roc_auc_score`, `average_precision_score`, `roc_curve`).
PRO has no maintained implementation in our stack, so it follows the MVTec AD reference evaluation code
(Bergmann et al., `generic_util.compute_pro` + `trapezoid`) line for line: ground-truth regions are the
8-connected components of each mask; for every threshold the per-region overlap is averaged over all
regions of all images, the false-positive rate is counted over every defect-free pixel (normal images
included); the PRO curve is integrated up to `max_fpr` (0.3 by default, interpolating at the limit) and
divided by `max_fpr`, so a perfect map scores 1.

Maps and masks may have different sizes per image (real datasets do): pixel metrics take lists.
Every function returns None instead of raising when a metric is undefined (one class only, no masks).
Metrics on decisions (accuracy, precision, recall, F1 of labels) live in `anomaly_assistant.scoring`, shared
with the training rewards.
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Sequence

import numpy as np


def _labels_scores(gt_labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(gt_labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.shape[0]} labels vs {s.shape[0]} scores")
    return y, s


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def image_auroc(gt_labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of image scores (1 = anomalous). None with a single class."""
    from sklearn.metrics import roc_auc_score

    y, s = _labels_scores(gt_labels, scores)
    return float(roc_auc_score(y, s)) if _both_classes(y) else None


def image_ap(gt_labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Average precision (area under precision-recall, anomalous = positive). None with a single class."""
    from sklearn.metrics import average_precision_score

    y, s = _labels_scores(gt_labels, scores)
    return float(average_precision_score(y, s)) if _both_classes(y) else None


def roc_points(gt_labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of the ROC curve, for plots."""
    from sklearn.metrics import roc_curve

    y, s = _labels_scores(gt_labels, scores)
    if not _both_classes(y):
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def _flat_pixels(
    gt_masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    if len(gt_masks) != len(anomaly_maps):
        raise ValueError(f"{len(gt_masks)} masks vs {len(anomaly_maps)} maps")
    for i, (m, a) in enumerate(zip(gt_masks, anomaly_maps)):
        if np.shape(m) != np.shape(a):
            raise ValueError(f"image {i}: mask shape {np.shape(m)} != map shape {np.shape(a)}")
    if not gt_masks:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32)
    y = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in gt_masks])  # [P]
    s = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in anomaly_maps])  # [P]
    return y, s


def pixel_auroc(gt_masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]) -> float | None:
    """ROC AUC over every pixel of every image (normal images contribute all-negative pixels)."""
    from sklearn.metrics import roc_auc_score

    y, s = _flat_pixels(gt_masks, anomaly_maps)
    if y.size == 0 or y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def pro_curve(
    gt_masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) at every distinct threshold, from (0, 0) to (1, 1), as in MVTec's `compute_pro`.

    Each defect pixel adds 1/|its region| to the summed overlap once the threshold falls below its score,
    each defect-free pixel adds 1/#defect-free-pixels to the FPR; cumulative sums over the scores sorted
    in descending order give both curves at once.
    """
    from scipy import ndimage

    y, s = _flat_pixels(gt_masks, anomaly_maps)
    structure = np.ones((3, 3), dtype=int)
    pro_change = np.zeros(y.shape, dtype=np.float64)  # [P]
    n_regions = 0
    offset = 0
    for mask in gt_masks:
        mask = np.asarray(mask, dtype=bool)
        labeled, n = ndimage.label(mask, structure=structure)
        if n:
            sizes = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)  # [n+1]
            inv = np.zeros_like(sizes)
            inv[1:] = 1.0 / sizes[1:]
            pro_change[offset: offset + mask.size] = inv[labeled.ravel()]
        n_regions += n
        offset += mask.size
    fp_change = (~y).astype(np.float64)  # [P]
    n_ok = fp_change.sum()
    if n_regions == 0 or n_ok == 0:
        return None
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    fprs = np.cumsum(fp_change[order]) / n_ok
    pros = np.cumsum(pro_change[order]) / n_regions
    keep = np.append(np.diff(s_sorted) != 0, True)  # last index of each run of equal scores
    fprs = np.clip(fprs[keep], None, 1.0)
    pros = np.clip(pros[keep], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Trapezoid area under y(x) up to `x_max`, interpolating y at `x_max` (MVTec's `trapezoid`)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(list(x), x_max)
            if not 0 < ins < len(x):
                raise ValueError("x_max outside the curve's range")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def pro_score(
    gt_masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray], max_fpr: float = 0.3
) -> float | None:
    """Normalised area under the PRO curve for FPR in [0, max_fpr] (1.0 = perfect). None without defects."""
    curve = pro_curve(gt_masks, anomaly_maps)
    if curve is None:
        return None
    fprs, pros = curve
    return trapezoid(fprs, pros, x_max=max_fpr) / max_fpr
