"""Few-shot fitted expert on a real MVTec-layout category: image / pixel AUROC over seeded reference draws.

For each seed: k good images drawn like `eval ad --reference-seed S` (eval.ad.reference_paths), `fit_expert`
with the given settings (the only images of the part the method sees), then every test image scored three
ways from one forward pass: the product (LTFM fused with the reference bank, calibrated), the LTFM alone and
the reference bank alone (the training-free baseline on the same references). Metrics come from `eval ad`'s
own `compute` (full-resolution maps), so the figures are comparable with `eval ad`.

    python research/expert_fit_study.py --category magnetic_tile --seeds 0 1 2 --out runs/fit/mt

A research script, not part of the installed package; results are logged in docs/experiments.md.
"""

from __future__ import annotations

import anomaly_assistant  # noqa: F401 - first: it sets torch's OpenMP spin count before torch loads

# isort: split

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomaly_assistant.eval.ad import compute, reference_paths, test_records
from anomaly_assistant.expert.fitted import FittedExpert
from anomaly_assistant.expert.reference import upsample_map
from anomaly_assistant.train.expert_fit import FitConfig, fit_expert

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-dev"


def score_all(fitted: FittedExpert, records: list, batch: int = 8) -> dict[str, list[dict]]:
    """Per variant, eval.ad-style prediction dicts for every record."""
    variants: dict[str, list[dict]] = {k: [] for k in ("fused", "ltfm", "reference", "fused_max", "ltfm_max")}
    for s in range(0, len(records), batch):
        chunk = records[s : s + batch]
        images = [Image.open(r.image_path).convert("RGB") for r in chunk]
        for rec, im, o in zip(chunk, images, fitted.outputs(images)):
            size = (im.size[1], im.size[0])
            cal = fitted.calibration
            rows = {
                "fused": (float(cal(float(o.score))), cal(upsample_map(o.anomaly_map.float(), size))),
                "ltfm": (float(torch.sigmoid(o.score_logit)), upsample_map(o.ltfm_map.float(), size)),
                "reference": (float(o.reference_score), upsample_map(o.reference_map.float(), size)),
                # image score = the map's maximum instead of the score head (same maps)
                "fused_max": (float(o.anomaly_map.max()), None),
                "ltfm_max": (float(o.ltfm_map.max()), None),
            }
            for name, (score, amap) in rows.items():
                if amap is None:  # a score-only variant shares the map of its base
                    amap = rows[name.removesuffix("_max")][1]
                variants[name].append(
                    {
                        "image_path": rec.image_path,
                        "gt_label": int(rec.gt_label),
                        "defect_type": rec.defect_type,
                        "category": rec.category,
                        "score": score,
                        "pred_label": int(score >= 0.5),
                        "anomaly_map": amap.numpy().astype(np.float16).astype(np.float32),
                        "pred_boxes": [],
                    }
                )
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=1, help="score every Nth test image")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=FitConfig.steps)
    p.add_argument("--views", type=int, default=FitConfig.views)
    p.add_argument("--no-mask-loss", action="store_true")
    p.add_argument("--init", default="", help="start each fit from this saved expert (e.g. a stage-1 one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/fit/study")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records = test_records(a.data, a.category)[:: a.limit]
    summary = []
    for seed in a.seeds:
        refs = reference_paths(a.data, a.category, a.k, seed)
        cfg = FitConfig(
            minutes=a.minutes,
            steps=a.steps,
            views=a.views,
            mask_loss=not a.no_mask_loss,
            init=a.init,
            seed=seed,
            progress=False,
        )
        t0 = time.time()
        fitted = fit_expert([Image.open(r).convert("RGB") for r in refs], cfg, [Path(r).name for r in refs])
        fitted.save(out / f"expert_seed{seed}")
        t_fit = time.time() - t0
        variants = score_all(fitted, records)
        row = {
            "seed": seed,
            "references": [Path(r).name for r in refs],
            "fit_seconds": round(t_fit, 1),
            "steps_run": fitted.info["steps_run"],
            "threshold": fitted.calibration.threshold,
            "score_seconds": round(time.time() - t0 - t_fit, 1),
        }
        for name, preds in variants.items():
            res = compute(records, preds)
            row[name] = {k: res[k] for k in ("image_auroc", "pixel_auroc", "pro")}
            row[name]["at_0.5"] = {k: res["at_threshold"][k] for k in ("recall", "precision", "fp", "tn")}
            row[name]["per_defect_image_auroc"] = {
                d: round(v["image_auroc"], 3) for d, v in res["per_defect"].items()
            }
        summary.append(row)
        print(json.dumps(row), flush=True)
        with (out / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    for name in summary[0]:
        if not isinstance(summary[0][name], dict):
            continue
        img = [r[name]["image_auroc"] for r in summary]
        px = [r[name]["pixel_auroc"] for r in summary]
        print(
            f"{name}: image AUROC {np.mean(img):.3f} ({min(img):.3f}-{max(img):.3f}), "
            f"pixel AUROC {np.mean(px):.3f} ({min(px):.3f}-{max(px):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
