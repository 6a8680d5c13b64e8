"""Reference matching: coreset coverage, NN distances, calibration, planted and real defects, determinism."""


import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from anomaly_assistant.expert.reference import (
    BankConfig,
    MemoryBank,
    ReferenceScreener,
    ScreenerConfig,
    box_mean,
    calibrate,
    greedy_coreset,
    nn_distance,
    normalize_illumination,
)
from anomaly_assistant.expert.sources import EfficientNetLite0Config, EfficientNetLite0Source


@pytest.fixture(scope="session")
def source():
    return EfficientNetLite0Source(EfficientNetLite0Config(image_size=256, resize="aspect", pad=32))


@pytest.fixture(scope="session")
def brick():
    """A real texture (scikit-image's CC0 brick), cut into references and a query."""
    a = data.brick()  # 512x512 grey
    crops = [a[y : y + 192, x : x + 192] for y, x in [(0, 0), (0, 300), (300, 0), (300, 300), (150, 150)]]
    return [Image.fromarray(c).convert("RGB") for c in crops]


def test_nn_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(300, 17, generator=g), torch.randn(500, 17, generator=g)
    ref = torch.cdist(q, b)
    torch.testing.assert_close(nn_distance(q, b, chunk=64), ref.min(1).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        nn_distance(q, b, k=3), ref.topk(3, largest=False).values.mean(1), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "shape,k", [((1, 40, 32, 32), 3), ((2, 5, 7, 3), 3), ((1, 3, 1, 1), 3), ((1, 4, 6, 9), 5)]
)
def test_box_mean_is_average_pooling_over_valid_cells(shape, k):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    torch.testing.assert_close(box_mean(x, k), expected)
    corner = x[0, :, : k // 2 + 1, : k // 2 + 1].mean((1, 2))  # a corner window holds only its valid cells
    torch.testing.assert_close(box_mean(x, k)[0, :, 0, 0], corner)


def test_coreset_picks_are_k_center_greedy():
    """Each pick is the point farthest from all earlier picks (checked against a plain cdist loop, no
    projection)."""
    x = torch.randn(500, 24, generator=torch.Generator().manual_seed(3))
    expected, mind = [0], torch.cdist(x, x[:1]).squeeze(1)
    for _ in range(59):
        expected.append(int(mind.argmax()))
        mind = torch.minimum(mind, torch.cdist(x, x[expected[-1]][None]).squeeze(1))
    assert greedy_coreset(x, 60, proj_dim=64).tolist() == expected


def test_coreset_keeps_coverage_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(20, 64, generator=g) * 10
    sizes = [400] + [5] * 19  # one dominant mode, 19 rare ones
    x = torch.cat([c + torch.randn(n, 64, generator=g) * 0.3 for c, n in zip(centers, sizes)])
    idx = greedy_coreset(x, 40)
    assert torch.equal(idx, greedy_coreset(x, 40))
    assert len(set(idx.tolist())) == 40
    cover = torch.cdist(x, x[idx]).min(1).values.max()
    rand = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:40]
    assert cover < torch.cdist(x, x[rand]).min(1).values.max()
    # every rare mode keeps a representative
    owner = torch.cdist(x[idx], centers).argmin(1)
    assert set(owner.tolist()) == set(range(20))


def test_bank_coreset_keeps_scores_close(source, brick):
    levels = source(brick[:4])
    raw = dict(relative=False, position_norm=0)  # raw NN distances
    full = MemoryBank(BankConfig(max_bank=0, **raw)).fit(levels)
    small = MemoryBank(BankConfig(max_bank=400, **raw)).fit(levels)
    assert small.features.shape[0] == 400 < full.features.shape[0]
    q = source([brick[4]])[0]
    a, b = full.distance_map(q), small.distance_map(q)
    assert (b >= a - 1e-4).all()  # a subset can only be farther
    assert float(b.max()) < 1.5 * float(a.max())


def test_calibrate_is_monotone_in_unit_interval():
    z = torch.linspace(0, 10, 50)
    c = calibrate(z)
    assert float(c[0]) == 0.0 and abs(float(calibrate(1.0)) - 0.5) < 1e-6
    assert (c.diff() > 0).all() and float(c.max()) < 1.0


def test_identical_image_scores_low_and_planted_defect_peaks(source, brick):
    # no mirrored reference views: a reference image must then match itself exactly
    cfg = ScreenerConfig(image_size=192, scale="reference", augment=())
    scr = ReferenceScreener(source, cfg).fit(brick[:4])
    a = np.array(brick[4])
    a[100:116, 40:56] = 0  # a dark 16 px blot
    same, clean, bad = scr.predict([brick[1], brick[4], Image.fromarray(a)])
    assert same.score < 0.05 and not same.label
    assert bad.score > clean.score and bad.score > same.score
    assert bad.anomaly_map.shape == (192, 192)
    assert 0.0 <= bad.anomaly_map.min() and bad.anomaly_map.max() <= 1.0
    y, x = np.unravel_index(bad.anomaly_map.argmax(), bad.anomaly_map.shape)
    assert 92 <= y <= 124 and 32 <= x <= 64


def test_each_reference_is_calibrated_with_the_other_references_profile(source, brick):
    """A position profile that contains the map it divides flattens that map's peaks and sets tau too low."""
    cfg = ScreenerConfig(image_size=192, augment=())
    held_out = ReferenceScreener(source, cfg).fit(brick[:3])
    in_sample_cfg = ScreenerConfig(image_size=192, augment=(), bank=BankConfig(held_out_profile=False))
    in_sample = ReferenceScreener(source, in_sample_cfg).fit(brick[:3])
    assert torch.equal(held_out.bank.profile, in_sample.bank.profile)  # what queries are divided by
    assert held_out.bank.tau > in_sample.bank.tau
    (clean,), (clean_in_sample,) = held_out.predict([brick[4]]), in_sample.predict([brick[4]])
    assert clean.score < clean_in_sample.score
    distance = clean_in_sample.raw_score * in_sample.bank.tau  # the same match, only its scale differs
    assert clean.raw_score * held_out.bank.tau == pytest.approx(distance)


def test_single_reference_calibration(source, brick):
    scr = ReferenceScreener(source).fit(brick[:1])
    assert np.isfinite(scr.bank.tau) and scr.bank.tau > 0
    r1, r2 = scr.predict([brick[0]]), scr.predict([brick[0]])
    # deterministic
    assert r1[0].score == r2[0].score and np.array_equal(r1[0].anomaly_map, r2[0].anomaly_map)
    assert r1[0].score < 0.05


def test_real_defects_localised_on_magnetic_tile(real_dev):
    """4 good references, screener defaults; the first two tiles of the three coarse defect types (measured:
    4 of 6 argmaxes fall inside the mask; thin blowholes/cracks are not reliably localised at 256 px, see
    research/screening_study.py)."""
    DATA = real_dev("magnetic_tile")
    refs = [Image.open(p).convert("RGB") for p in sorted((DATA / "train" / "good").glob("*"))[:4]]
    scr = ReferenceScreener(EfficientNetLite0Source(), ScreenerConfig()).fit(refs)
    hits, scores = 0, []
    for d in ("break", "fray", "uneven"):
        for p in sorted((DATA / "test" / d).glob("*"))[:2]:
            mask = np.asarray(Image.open(DATA / "ground_truth" / d / f"{p.stem}_mask.png").convert("L")) > 127
            (r,) = scr.predict([Image.open(p).convert("RGB")])
            assert r.anomaly_map.shape == mask.shape
            y, x = np.unravel_index(r.anomaly_map.argmax(), mask.shape)
            hits += bool(mask[y, x])
            scores.append(r.score)
    assert hits >= 3
    (same,) = scr.predict([refs[0]])
    assert same.score < min(scores)


def test_real_pcb_defects_localised_with_the_template_as_the_only_reference(real_dev):
    """DeepPCB: each defective board against its aligned defect-free template (k = 1, no mirrored views: a
    mirrored board is not a normal board). Measured: the argmax lands in a ground-truth box for 17 of these 20
    pairs, and for 151 of all 200 (75.5 %)."""
    from anomaly_assistant.data_builders.sources import read_deeppcb

    tests = [r for r in read_deeppcb(real_dev("deeppcb"), include_templates=False)][::10]
    assert len(tests) == 20
    source = EfficientNetLite0Source()
    hits = 0
    for rec in tests:
        reference = Image.open(rec.reference_path).convert("RGB")
        scr = ReferenceScreener(source, ScreenerConfig(augment=())).fit([reference])
        (r,) = scr.predict([Image.open(rec.image_path).convert("RGB")])
        y, x = np.unravel_index(r.anomaly_map.argmax(), r.anomaly_map.shape)
        hits += any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in rec.gt_boxes)
    assert hits >= 14


@pytest.mark.parametrize("mode", ["flatfield", "standardize"])
def test_grey_images_are_normalised_on_one_channel_like_their_rgb_copies(mode):
    grey = Image.fromarray(data.camera()[::2, ::2])  # 256x256 "L", with a lighting gradient across it
    one = normalize_illumination(grey, mode)
    three = normalize_illumination(grey.convert("RGB"), mode)
    assert one.mode == "L" and three.mode == "RGB"
    diff = np.abs(np.asarray(one.convert("RGB"), dtype=int) - np.asarray(three, dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # float rounding of the mean / std only
    assert np.asarray(one).std() > 20  # and it is a real picture, not a flat one
