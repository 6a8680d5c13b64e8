"""Few-shot reference screening study on real parts: ablations, AUROC, localisation and speed.

Image AUROC, pixel AUROC (sklearn's roc_auc_score; maps and masks resized so the longer side is <= 256 px,
masks by nearest neighbour), the rate at which a defective image's map argmax (original resolution) falls
inside its ground-truth mask, and throughput with the extraction / matching time split.

    python research/screening_study.py --presets baseline,final          # magnetic tile ablations
    python research/screening_study.py --presets all                     # the whole ablation table
    python research/screening_study.py --presets baseline,final_no_flip --deeppcb 100 --limit 99  # DeepPCB
    python research/screening_study.py --presets final_no_flip --deeppcb-quarters 60 --limit 99  # control
    python research/screening_study.py --speed-only --presets baseline,final
    python research/screening_study.py --presets defaults --deeppcb 200 --limit 99 \
        --deeppcb-model ~/.cache/anomaly-assistant/default-model-*   # + a checkpoint's inspection verdict

Data: ../shared/data/real-dev relative to the repo root (MVTec layout; 4 references = the first 4 of
train/good in sorted order, or `--reference-seed N` for a seeded random draw, `--k` for another count; all
test images).

A research script, not part of the installed package: it runs from a checkout and uses only public names of
`anomaly_assistant` (the screener and feature source, `eval ad`'s reference and test-image rules, the DeepPCB
reader). Its results are logged in docs/experiments.md.
"""

from __future__ import annotations

import anomaly_assistant  # noqa: F401 - first: it sets torch's OpenMP spin count before torch loads

# isort: split

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly_assistant import scoring
from anomaly_assistant.expert.reference import BankConfig, ReferenceScreener, ScreenerConfig, record_timings
from anomaly_assistant.expert.sources import EfficientNetLite0Config, EfficientNetLite0Source
from anomaly_assistant.localize import DEFAULT_THRESHOLD, boxes_for_verdict

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-dev"

# name -> (source config, screener config). Each row adds one change to the row before (the ablation chain).
# Every option is spelled out: the baseline must not drift when the library's defaults change.
_BASE_SRC = EfficientNetLite0Config(image_size=256, resize="square", blocks=(4, 10), pad=0, batch_size=2)
_BASE_SCR = ScreenerConfig(
    scale="source",
    image_size=256,
    illumination="none",
    augment=(),
    zoom=0.0,
    bank=BankConfig(
        patch_size=3,
        knn=1,
        max_bank=16384,
        blur_sigma=1.0,
        instance_norm=False,
        relative=False,
        position_norm=0,
    ),
)


def presets() -> dict[str, tuple[EfficientNetLite0Config, ScreenerConfig]]:
    """The ablation chain: each row adds one fix to the row above; "+zoom2" is a side branch off "final"."""
    p: dict[str, tuple[EfficientNetLite0Config, ScreenerConfig]] = {}
    src, scr = _BASE_SRC, _BASE_SCR
    bank = scr.bank
    p["baseline"] = (src, scr)
    scr = replace(scr, scale="reference")
    p["+aspect_scale"] = (src, scr)
    src = replace(src, pad=32)
    p["+reflect_pad"] = (src, scr)
    bank = replace(bank, position_norm=16)
    p["+position_norm"] = (src, replace(scr, bank=bank))
    bank = replace(bank, relative=True)
    p["+relative"] = (src, replace(scr, bank=bank))
    scr = replace(scr, illumination="flatfield")
    p["+flatfield"] = (src, replace(scr, bank=bank))
    bank = replace(bank, instance_norm=True)
    p["+instance_norm"] = (src, replace(scr, bank=bank))
    scr = replace(scr, augment=("hflip", "vflip"))
    p["+flip_refs"] = (src, replace(scr, bank=bank))
    bank = replace(bank, max_bank=2048)
    p["final"] = (src, replace(scr, bank=bank))  # + coreset to 2048 patches (speed)
    p["+zoom2"] = (src, replace(scr, bank=bank, zoom=2.0))
    p["final_no_flip"] = (src, replace(scr, bank=bank, augment=()))
    p["final_no_relative"] = (src, replace(scr, bank=replace(bank, relative=False)))
    p["final_no_pad"] = (replace(src, pad=0), replace(scr, bank=bank))
    sharp = replace(bank, patch_size=1, blur_sigma=0.0)  # the default model's reference matching
    p["final_sharp"] = (src, replace(scr, bank=sharp))
    p["final_no_flip_sharp"] = (src, replace(scr, bank=sharp, augment=()))
    p["defaults"] = (EfficientNetLite0Config(), ScreenerConfig())  # what `eval ad` and `inspect` use
    return p


def load_mvtec(root: Path, k: int = 4, reference_seed: int | None = None):
    """-> references (PIL), test records [(image, mask bool array or None, defect_type)].

    References and test images follow the `eval ad` rules (`ad.reference_paths`, `ad.test_records`).
    """
    from anomaly_assistant.eval import ad

    refs = [
        Image.open(p).convert("RGB") for p in ad.reference_paths(root.parent, root.name, k, reference_seed)
    ]
    recs = []
    for rec in ad.test_records(root.parent, root.name):
        im = Image.open(rec.image_path).convert("RGB")
        mask = np.asarray(Image.open(rec.gt_mask).convert("L")) > 127 if rec.gt_mask else None
        recs.append((im, mask, rec.defect_type or "good"))
    return refs, recs


def _small(a: np.ndarray, mode, max_side: int = 256) -> np.ndarray:
    h, w = a.shape
    f = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if mode == "mask":
        return np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def evaluate(results, recs) -> dict[str, float]:
    labels = np.array([m is not None for _, m, _ in recs])
    scores = np.array([r.score for r in results])
    raw = np.array([r.raw_score for r in results])
    pm, pl, hits = [], [], []
    for r, (_, mask, _) in zip(results, recs):
        gt = mask if mask is not None else np.zeros(r.anomaly_map.shape, bool)
        if mask is not None:
            y, x = np.unravel_index(np.argmax(r.anomaly_map), r.anomaly_map.shape)
            hits.append(bool(mask[y, x]))
        pm.append(_small(r.anomaly_map, "map").ravel())
        pl.append(_small(gt, "mask").ravel())
    types = np.array([d for _, _, d in recs])
    per_type, pixel_per_type, positive = {}, {}, {}
    for d in sorted(set(types[labels])):
        keep = (types == d) | ~labels  # this defect type's images plus all good images
        per_type[d] = roc_auc_score(labels[keep], raw[keep])
        pixel_per_type[d] = roc_auc_score(
            np.concatenate([pl[i] for i in np.flatnonzero(keep)]),
            np.concatenate([pm[i] for i in np.flatnonzero(keep)]),
        )
        positive[d] = sum(int(pl[i].sum()) for i in np.flatnonzero(types == d))
    total = max(1, sum(positive.values()))
    return {
        "per_type": per_type,
        "pixel_per_type": pixel_per_type,
        "positive_pixel_share": {d: v / total for d, v in positive.items()},
        "image_auroc": roc_auc_score(labels, raw if np.ptp(scores) == 0 else scores),
        "pixel_auroc": roc_auc_score(np.concatenate(pl), np.concatenate(pm)),
        "argmax_in_mask": float(np.mean(hits)) if hits else float("nan"),
        "good_flagged": float(np.mean([r.label for r, bad in zip(results, labels) if not bad])),
        "defect_flagged": float(np.mean([r.label for r, bad in zip(results, labels) if bad])),
    }


def _source(src_cfg, source_cache) -> EfficientNetLite0Source:
    """One network per source configuration, shared by every preset and study that uses it."""
    key = repr(src_cfg)
    if key not in source_cache:
        source_cache[key] = EfficientNetLite0Source(src_cfg)
    return source_cache[key]


def run_preset(src_cfg, scr_cfg, refs, recs, source_cache):
    """Screen every test record against the references with one preset."""
    scr = ReferenceScreener(_source(src_cfg, source_cache), scr_cfg).fit(refs)
    return scr.predict([im for im, _, _ in recs])


def speed(src_cfg, scr_cfg, refs, images, source_cache, repeats: int = 1):
    """Images/s of predict() with the references fitted, and ms per image of extraction and of matching."""
    scr = ReferenceScreener(_source(src_cfg, source_cache), scr_cfg).fit(refs)
    scr.predict(images[:4])  # warm-up
    with record_timings() as timings:
        t = time.perf_counter()
        for _ in range(repeats):
            scr.predict(images)
        dt = time.perf_counter() - t
    n = len(images) * repeats
    return n / dt, timings["extract"] / n * 1e3, timings["match"] / n * 1e3


def load_deeppcb(root: Path, n: int):
    """-> [(template PIL, test PIL, box mask, boxes)] for the first n pairs in the DeepPCB reader's order."""
    from anomaly_assistant.data_builders.sources import read_deeppcb

    pairs = []
    for rec in read_deeppcb(root, include_templates=False)[:n]:
        im = Image.open(rec.image_path).convert("RGB")
        mask = np.zeros((im.size[1], im.size[0]), bool)
        for x1, y1, x2, y2 in rec.gt_boxes:
            mask[int(y1) : int(y2), int(x1) : int(x2)] = True
        template = Image.open(rec.reference_path).convert("RGB")
        pairs.append((template, im, mask, [list(b) for b in rec.gt_boxes]))
    return pairs


def deeppcb_study(src_cfg, scr_cfg, pairs, source_cache):
    """Template as the single reference, test image as query; normals = the template's own flipped copy.

    Box recall: the share of true boxes matched one-to-one (`scoring.box_scores`) by a box of the product at
    IoU >= 0.1 / 0.5; "shown" boxes
    exist only where the verdict is anomalous (as a Finding shows them), "map" boxes are the product's rule
    applied to every board (`boxes_for_verdict`), the localisation alone.
    """
    src = _source(src_cfg, source_cache)
    pm, pl, hits, s_def, s_norm, flagged = [], [], [], [], [], []
    matched = {f"{kind}_box_recall@{t}": 0 for kind in ("shown", "map") for t in (0.1, 0.5)}
    n_true = 0
    for temp, test, mask, truth in pairs:
        scr = ReferenceScreener(src, scr_cfg).fit([temp])
        r_def, r_norm = scr.predict([test, temp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        y, x = np.unravel_index(np.argmax(r_def.anomaly_map), r_def.anomaly_map.shape)
        hits.append(bool(mask[y, x]))
        pm.append(_small(r_def.anomaly_map, "map").ravel())
        pl.append(_small(mask, "mask").ravel())
        s_def.append(r_def.score)
        s_norm.append(r_norm.score)
        flagged.append(r_def.label)
        amap = r_def.anomaly_map
        shown = boxes_for_verdict(amap, DEFAULT_THRESHOLD) if r_def.label else []
        boxes = {"shown": shown, "map": boxes_for_verdict(amap, DEFAULT_THRESHOLD)}
        n_true += len(truth)
        for kind, found in boxes.items():
            coords = [b.as_list() for b in found]
            for t in (0.1, 0.5):  # one-to-one matches, as the default model's card counts them
                matched[f"{kind}_box_recall@{t}"] += len(scoring.box_scores(coords, truth, t).matches)
    lab = np.r_[np.ones(len(s_def)), np.zeros(len(s_norm))]
    return {
        "pixel_auroc": roc_auc_score(np.concatenate(pl), np.concatenate(pm)),
        "argmax_in_box": float(np.mean(hits)),
        "image_auroc_vs_flipped_template": roc_auc_score(lab, np.r_[s_def, s_norm]),
        "defect_flagged": float(np.mean(flagged)),
        **{name: hits / max(n_true, 1) for name, hits in matched.items()},
    }


def deeppcb_quarter_control(src_cfg, scr_cfg, pairs, source_cache):
    """A normal control with real capture differences.

    Each quarter of a test board is screened against the same quarter of its template (the single reference);
    quarters that no defect box touches are the normals.
    """
    src = _source(src_cfg, source_cache)
    labels, scores, flags = [], [], []
    for temp, test, mask, _ in pairs:
        for box in _quarters(test):
            (r,) = ReferenceScreener(src, scr_cfg).fit([temp.crop(box)]).predict([test.crop(box)])
            labels.append(bool(mask[box[1] : box[3], box[0] : box[2]].any()))
            scores.append(r.score)
            flags.append(r.label)
    lab, sc, flagged = np.array(labels), np.array(scores), np.array(flags)
    return {
        "normal_quarters": int((~lab).sum()),
        "defect_quarters": int(lab.sum()),
        "image_auroc": roc_auc_score(lab, sc) if 0 < lab.sum() < len(lab) else float("nan"),
        "normal_flagged": float(flagged[~lab].mean()) if (~lab).any() else float("nan"),
        "defect_flagged": float(flagged[lab].mean()) if lab.any() else float("nan"),
    }


def _quarters(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """The four quarter boxes (x0, y0, x1, y1) of an image."""
    W, H = image.size
    corners = ((0, 0), (W // 2, 0), (0, H // 2), (W // 2, H // 2))
    return [(x0, y0, x0 + W // 2, y0 + H // 2) for x0, y0 in corners]


def deeppcb_model_study(model_dir: Path, pairs) -> dict:
    """A checkpoint's inspection verdict on DeepPCB: its expert's fused score (`expert_outputs`).

    Each board against its template, each defect-free quarter against the template's quarter; the reference
    half and the LTFM half alone for comparison. The verdict of a checkpoint with `expert_answer_fields` is
    this score's. Box recall at IoU 0.1 / 0.5 comes from each board's inspection (`inspect_batch`, a short
    answer: with `expert_answer_fields` the boxes are the expert's).
    """
    from anomaly_assistant import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained(str(model_dir))
    boards: dict[str, list[float]] = {"fused": [], "reference": [], "ltfm": []}
    clean: dict[str, list[float]] = {"fused": [], "reference": [], "ltfm": []}
    matched, n_true = {0.1: 0, 0.5: 0}, 0
    for temp, test, mask, truth in pairs:
        (finding,) = assistant.inspect_batch([test], references=[temp], max_new_tokens=24)
        n_true += len(truth)
        for t in matched:
            matched[t] += len(scoring.box_scores([b.as_list() for b in finding.boxes], truth, t).matches)
        jobs = [(boards, test, temp)] + [(clean, test.crop(b), temp.crop(b)) for b in _quarters(test)
                                         if not mask[b[1] : b[3], b[0] : b[2]].any()]
        for into, query, template in jobs:
            (out,) = assistant.expert_outputs([query], references=[template])
            into["fused"].append(float(out.score))
            into["reference"].append(float(out.reference_score))
            into["ltfm"].append(float(out.ltfm_score))
    out = {"boards": len(boards["fused"]), "clean_quarters": len(clean["fused"])}
    for name in boards:
        b, c = np.array(boards[name]), np.array(clean[name])
        out[f"{name}_boards_flagged"] = float((b >= DEFAULT_THRESHOLD).mean())
        out[f"{name}_clean_flagged"] = float((c >= DEFAULT_THRESHOLD).mean())
        out[f"{name}_auroc"] = roc_auc_score(np.r_[np.ones(len(b)), np.zeros(len(c))], np.r_[b, c])
    return {**out, **{f"box_recall@{t}": hits / max(n_true, 1) for t, hits in matched.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--presets", default="baseline,final", help="comma list, or 'all'")
    ap.add_argument("--k", type=int, default=4, help="number of reference normals")
    ap.add_argument(
        "--reference-seed",
        type=int,
        default=None,
        help="draw the k references at random with this seed (default: the first k of train/good)",
    )
    ap.add_argument("--limit", type=int, default=0, help="use every n-th test image (0 = all)")
    ap.add_argument("--deeppcb", type=int, default=0, help="also run this many DeepPCB pairs")
    ap.add_argument(
        "--deeppcb-quarters",
        type=int,
        default=0,
        help="also screen the quarters of this many DeepPCB pairs (defect-free quarters = normal control)",
    )
    ap.add_argument(
        "--deeppcb-model",
        type=Path,
        default=None,
        help="with --deeppcb N: also this checkpoint's inspection verdict (e.g. the default model's folder)",
    )
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = presets()
    names = list(table) if args.presets == "all" else args.presets.split(",")
    refs, recs = load_mvtec(args.data / args.category, args.k, args.reference_seed)
    if args.limit:
        recs = recs[:: args.limit]
    cache: dict = {}
    speed_imgs = [im for im, _, _ in recs[::10]][:48]
    print(
        f"{args.category}: {len(refs)} references, {len(recs)} test images "
        f"({sum(m is not None for _, m, _ in recs)} defective)"
    )
    hdr = (
        f"{'preset':<16}{'img AUROC':>10}{'px AUROC':>10}{'argmax∈mask':>12}{'good>thr':>9}{'bad>thr':>9}"
        f"{'img/s':>8}{'ext ms':>8}{'match ms':>9}"
    )
    print(hdr)
    for name in names:
        src_cfg, scr_cfg = table[name]
        ips, ext, mat = speed(src_cfg, scr_cfg, refs, speed_imgs, cache)
        if args.speed_only:
            print(f"{name:<16}{'':>10}{'':>10}{'':>12}{'':>9}{'':>9}{ips:>8.1f}{ext:>8.1f}{mat:>9.1f}")
            continue
        results = run_preset(src_cfg, scr_cfg, refs, recs, cache)
        m = evaluate(results, recs)
        print(
            f"{name:<16}{m['image_auroc']:>10.3f}{m['pixel_auroc']:>10.3f}{m['argmax_in_mask']:>12.3f}"
            f"{m['good_flagged']:>9.2f}{m['defect_flagged']:>9.2f}{ips:>8.1f}{ext:>8.1f}{mat:>9.1f}",
            flush=True,
        )
        print(
            " " * 16 + "image AUROC per type: " + "  ".join(f"{k}={v:.2f}" for k, v in m["per_type"].items())
        )
        print(
            " " * 16
            + "pixel AUROC per type: "
            + "  ".join(
                f"{k}={v:.2f} ({m['positive_pixel_share'][k]:.0%} of defect pixels)"
                for k, v in m["pixel_per_type"].items()
            )
        )
    deeppcb_runs = (
        (args.deeppcb, deeppcb_study, "template/test pairs (k=1)"),
        (args.deeppcb_quarters, deeppcb_quarter_control, "pairs in quarters, each vs its template quarter"),
    )
    for n, study, what in deeppcb_runs:
        if not n:
            continue
        pairs = load_deeppcb(args.data / "deeppcb", n)
        print(f"\ndeeppcb: {len(pairs)} {what}")
        for name in names:
            src_cfg, scr_cfg = table[name]
            m = study(src_cfg, scr_cfg, pairs, cache)
            print(
                f"{name:<16}"
                + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()),
                flush=True,
            )
    if args.deeppcb and args.deeppcb_model:
        m = deeppcb_model_study(args.deeppcb_model, load_deeppcb(args.data / "deeppcb", args.deeppcb))
        print(f"\ndeeppcb, {args.deeppcb_model}: " + "  ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


if __name__ == "__main__":
    main()
