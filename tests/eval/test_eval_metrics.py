"""AD metrics against scikit-learn on random data, hand-computed cases and worked PRO examples."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly_assistant.eval import metrics as M


def test_image_auroc_ap_match_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 200)
        s = rng.normal(size=200) + y * rng.uniform(0, 2)
        s[:20] = np.round(s[:20])  # ties must be handled like sklearn
        assert M.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_image_metrics_hand_computed_and_undefined():
    # pairs (pos, neg): (0.9>0.1) (0.9>0.4) (0.35<0.4) (0.35>0.1) -> 3/4
    assert M.image_auroc([1, 1, 0, 0], [0.9, 0.35, 0.4, 0.1]) == pytest.approx(0.75)
    # ranked: 0.9(+) 0.4(-) 0.35(+): AP = 1*1/2 + 2/3*1/2
    assert M.image_ap([1, 1, 0, 0], [0.9, 0.35, 0.4, 0.1]) == pytest.approx(0.5 + 1 / 3)
    assert M.image_auroc([1, 1], [0.2, 0.3]) is None
    assert M.image_ap([0, 0], [0.2, 0.3]) is None
    with pytest.raises(ValueError):
        M.image_auroc([1, 0], [0.1])


def test_pixel_auroc_over_images_of_different_sizes_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = [rng.random((5, 7)) > 0.8, np.zeros((3, 4), bool), rng.random((6, 2)) > 0.5]
    maps = [m * 0.5 + rng.random(m.shape) for m in masks]
    ref = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps]))
    assert M.pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-7)
    assert M.pixel_auroc([np.zeros((2, 2), bool)], [np.ones((2, 2))]) is None
    with pytest.raises(ValueError):
        M.pixel_auroc([np.zeros((2, 2), bool)], [np.ones((2, 3))])


def test_pro_worked_example_one_region_and_a_normal_image():
    # Image A: one region {0.9, 0.2} and defect-free pixels {0.1, 0.3}; image B normal {0.4, 0.05, 0, 0}.
    # Descending: 0.9(R) 0.4 0.3 0.2(R) 0.1 0.05 0 0
    #   -> points (fpr, pro): (0, .5) (1/6, .5) (2/6, .5) (2/6, 1) ...
    # Area to 0.3: .5 * 1/6 + .5 * (0.3 - 1/6) = 0.15 -> / 0.3 = 0.5; to 0.5: (.5/6 + .5/6 + 1/6) / .5 = 2/3.
    masks = [np.array([[1, 1, 0, 0]], bool), np.zeros((1, 4), bool)]
    maps = [np.array([[0.9, 0.2, 0.1, 0.3]]), np.array([[0.4, 0.05, 0.0, 0.0]])]
    assert M.pro_score(masks, maps) == pytest.approx(0.5)
    assert M.pro_score(masks, maps, max_fpr=0.5) == pytest.approx(2 / 3)
    fpr, pro = M.pro_curve(masks, maps)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_pro_regions_are_8_connected_and_averaged_per_region():
    # Image 1: the two diagonal pixels form ONE region (size 2); image 2: one pixel region.
    # 0.9 covers half of region 1 -> PRO (1/2 + 0)/2 = .25; 0.1 covers region 2 -> .75; then fpr jumps to 1.
    # y(0.3) = .75 + .25 * .3 = .825; area = .5 * (.825 + .75) * .3 -> PRO = .7875 (4-connectivity: .7167).
    masks = [np.array([[1, 0], [0, 1]], bool), np.array([[1, 0], [0, 0]], bool)]
    maps = [np.array([[0.9, 0.0], [0.0, 0.0]]), np.array([[0.1, 0.0], [0.0, 0.0]])]
    assert M.pro_score(masks, maps) == pytest.approx(0.7875)


def test_pro_perfect_and_undefined():
    masks = [np.array([[1, 0, 1, 1, 1]], bool), np.zeros((2, 3), bool)]
    maps = [np.array([[0.8, 0.0, 0.7, 0.1, 0.1]]), np.zeros((2, 3))]
    assert M.pro_score(masks, maps) == pytest.approx(1.0)
    assert M.pro_score([np.zeros((2, 2), bool)], [np.ones((2, 2))]) is None


def test_pro_curve_matches_a_brute_force_threshold_sweep():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    masks = [ndimage.binary_dilation(rng.random((9, 11)) > 0.93) for _ in range(3)] + [np.zeros((4, 5), bool)]
    maps = [np.round(rng.random(m.shape) + 0.6 * m, 2) for m in masks]
    fpr, pro = M.pro_curve(masks, maps)
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        pred = [a >= t for a in maps]
        ok = sum((~m).sum() for m in masks)
        want_fpr = sum((p & ~m).sum() for p, m in zip(pred, masks)) / ok
        overlaps = []
        for m, p in zip(masks, pred):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            overlaps += [(p & (lab == k)).sum() / (lab == k).sum() for k in range(1, n + 1)]
        hits = np.isclose(fpr, want_fpr) & np.isclose(pro, np.mean(overlaps))
        assert hits.any(), (t, want_fpr, np.mean(overlaps))
