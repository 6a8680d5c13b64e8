"""Few-shot fitting: adapt the expert to one part from k >= 1 good images, no defective image of that part.

    anomaly-assistant expert fit --normals DIR --out EXPERT_DIR [--minutes 5] [--seed 0]

The DRAEM / CutPaste / GLASS recipe on top of the training-free bank: each training view is one of the normals
under a light augmentation (the screener's mirror views, a small crop, brightness and contrast); half of the
views get a defect synthesised on them (`data_builders.defects.synthesize`: cut-paste, scratch, crack, stain,
hole, missing part, foreign object, Perlin blend) with its exact mask. The expert's LTFM and score head
train on these with the stage-1 loss (`train.expert.train_expert`; balanced BCE + focal + dice); the feature
source stays frozen, so features are extracted once. A separate set of held-out views (new augmentations,
new defects) sets the calibration (see `anomaly_assistant.expert.fitted`). The result is a `FittedExpert`
folder that `AnomalyAssistant.expert_only(expert=DIR)` and `anomaly-assistant inspect --expert DIR` load.

Deterministic for a seed (same normals, same thread count): the budget `--minutes` only stops training early
when it runs out, and fit.json records how many steps ran.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from anomaly_assistant.commands.config import parse_config
from anomaly_assistant.commands.runtime import InputError, UsageError, note, run_command
from anomaly_assistant.data_builders.defects import DEFECT_KINDS, foreground, synthesize
from anomaly_assistant.expert.fitted import (
    Calibration,
    FittedExpert,
    build_source,
    efficientnet_expert_config,
)
from anomaly_assistant.expert.model import AnomalyExpert
from anomaly_assistant.expert.reference import ReferenceScreener, ScreenerConfig
from anomaly_assistant.train.expert import Sample, make_samples, train_expert

PROG = "anomaly-assistant expert"


@dataclass
class FitConfig:
    """Fit the expert to one part from a few good images (no defective images needed)."""

    normals: str = field(default="", metadata={"help": "folder (or one file) of good images of the part"})
    out: str = field(default="", metadata={"help": "folder to write the fitted expert into"})
    minutes: float = field(
        default=5.0, metadata={"help": "time budget; training stops early when it runs out"}
    )
    init: str = field(default="", metadata={"help": "start from this saved expert (e.g. a stage-1 expert)"})
    views: int = field(default=96, metadata={"help": "training views (half of them with a synthetic defect)"})
    calibration_views: int = field(
        default=24, metadata={"help": "held-out views for the calibration (half defective)"}
    )
    steps: int = field(default=300, metadata={"help": "optimisation steps"})
    batch_size: int = field(default=16, metadata={"help": "views per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay)"})
    mask_loss: bool = field(default=True, metadata={"help": "focal + dice on the synthetic defects' masks"})
    kinds: list[str] = field(
        default_factory=lambda: list(DEFECT_KINDS),
        metadata={"help": "defect families to synthesise", "aliases": ["--kind"]},
    )
    image_size: int = field(default=256, metadata={"help": "side the screener scales the part to"})
    seed: int = field(default=0, metadata={"help": "seed of views, defects, init and data order"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in DEFECT_KINDS]
        if bad:
            raise ValueError(f"unknown defect kinds {bad}; choose from {', '.join(DEFECT_KINDS)}")
        if self.views < 2 or self.calibration_views < 2 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("views and calibration_views must be >= 2, steps and batch_size >= 1")
        if self.minutes <= 0:
            raise ValueError("minutes must be > 0")


def augment(
    image: Image.Image, rng: np.random.Generator, flips: Sequence[str] = ("hflip", "vflip")
) -> Image.Image:
    """A light view of a normal image: allowed mirrors, a 90-100 % crop per side, brightness, contrast."""
    im = image.convert("RGB")
    if "hflip" in flips and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "vflip" in flips and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    w, h = im.size
    fw, fh = rng.uniform(0.9, 1.0, size=2)
    cw, ch = max(8, int(round(w * fw))), max(8, int(round(h * fh)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.92, 1.08)))
    return ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.92, 1.08)))


def synth_views(
    normals: Sequence[Image.Image],
    n: int,
    rng: np.random.Generator,
    kinds: Sequence[str],
    flips: Sequence[str],
) -> tuple[list[Image.Image], list[int], list[np.ndarray | None], list[int]]:
    """N views cycling over the normals, every 2nd with a synthetic defect: images, labels, masks, origin."""
    images, labels, masks, origin = [], [], [], []
    for i in range(n):
        j = i // 2 % len(normals)
        view = augment(normals[j], rng, flips)
        if i % 2:
            d = synthesize(view, rng=rng, region=foreground(view), kinds=tuple(kinds))
            images.append(Image.fromarray(d.image))
            labels.append(1)
            masks.append(d.mask)
        else:
            images.append(view)
            labels.append(0)
            masks.append(None)
        origin.append(j)
    return images, labels, masks, origin


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]


def fit_expert(
    normals: Sequence[Image.Image], config: FitConfig, names: Sequence[str] | None = None, source: Any = None
) -> FittedExpert:
    """Fit an expert on the normals (k >= 1), see the module docstring; `source` reuses a loaded source."""
    if not normals:
        raise ValueError("fitting needs at least one good image")
    t0 = time.monotonic()
    deadline = t0 + 60.0 * config.minutes
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if config.init:
        expert = AnomalyExpert.from_pretrained(config.init)
    else:
        expert = AnomalyExpert(efficientnet_expert_config(source_options={"image_size": config.image_size}))
    source = source or build_source(expert.config)
    normals = [im.convert("RGB") for im in normals]
    screener = ReferenceScreener(source, ScreenerConfig(image_size=config.image_size)).fit(normals)
    flips = screener.config.augment
    illum, scale = screener.config.illumination, screener.scale

    images, labels, masks, _ = synth_views(normals, config.views, rng, config.kinds, flips)
    train = make_samples(source, images, labels, masks, illum, scale, progress=config.progress)
    t_data = time.monotonic() - t0
    res = train_expert(
        expert,
        train,
        config.steps,
        config.batch_size,
        config.learning_rate,
        mask_loss=config.mask_loss,
        seed=config.seed,
        deadline=deadline,
        progress=config.progress,
    )
    expert.mark_trained()
    t_train = time.monotonic() - t0 - t_data

    # calibration on held-out views; each view's reference cue from a bank without its own normal (k >= 2)
    cal_rng = np.random.default_rng([config.seed, 1])
    c_images, c_labels, c_masks, c_origin = synth_views(
        normals, config.calibration_views, cal_rng, config.kinds, flips
    )
    cal = make_samples(source, c_images, c_labels, c_masks, illum, scale)
    banks = [screener.bank] * len(normals)
    if len(normals) > 1:
        banks = [
            ReferenceScreener(source, screener.config).fit([n for i, n in enumerate(normals) if i != j]).bank
            for j in range(len(normals))
        ]
    scores = _fused_scores(expert, cal, [banks[j] for j in c_origin])
    calibration = Calibration.fit(
        [s for s, y in zip(scores, c_labels) if y == 0], [s for s, y in zip(scores, c_labels) if y == 1]
    )
    info = {
        "kind": "fitted_expert",
        "fitted_on": [
            {"name": n, "sha256_16": _digest(im), "size": list(im.size)}
            for n, im in zip(names or [f"normal_{i}" for i in range(len(normals))], normals)
        ],
        "k": len(normals),
        "config": asdict(config),
        "steps_run": res["steps"],
        "train_loss": {k: res[k] for k in ("loss", "bce", "focal", "dice") if k in res},
        "calibration_scores": {
            "normal": scores_of(scores, c_labels, 0),
            "defect": scores_of(scores, c_labels, 1),
        },
        "seconds": {
            "data": round(t_data, 2),
            "train": round(t_train, 2),
            "total": round(time.monotonic() - t0, 2),
        },
    }
    return FittedExpert(expert, screener, calibration, info, normals)


def scores_of(scores: Sequence[float], labels: Sequence[int], label: int) -> list[float]:
    """The scores of one label, rounded for fit.json."""
    return [round(float(s), 4) for s, y in zip(scores, labels) if y == label]


@torch.no_grad()
def _fused_scores(expert: AnomalyExpert, samples: Sequence[Sample], banks: Sequence[Any]) -> list[float]:
    outs = expert.forward_batch(
        [s.levels for s in samples], [s.v0 for s in samples], list(banks), use_ltfm=True
    )
    return [float(o.score) for o in outs]


def _load_normals(path: str) -> tuple[list[Image.Image], list[str]]:
    from anomaly_assistant.images import ImageError, list_images, load_image

    if not path:
        raise UsageError("--normals DIR is required (a folder of good images of the part)")
    if not Path(path).exists():
        raise InputError(f"--normals {path}: no such file or folder")
    files = list_images(path)
    if not files:
        raise InputError(f"--normals {path}: no images found")
    try:
        return [load_image(str(f)) for f in files], [f.name for f in files]
    except ImageError as exc:
        raise InputError(str(exc)) from exc


def main(argv: list[str] | None = None, command: str = "expert") -> int:
    """`anomaly-assistant expert fit ...`: fit, save, print the folder and the calibration."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} fit --normals DIR --out EXPERT_DIR [--minutes N] [options]\n\n"
            "  fit   adapt the expert to one part from a few good images (see `fit --help`)"
        )
        return 0
    if argv[0] != "fit":
        print(f"{PROG}: unknown sub-command {argv[0]!r}; choose from fit", file=sys.stderr)
        return 2
    rest = argv[1:]

    def body() -> int:
        config = parse_config(FitConfig, rest, f"{PROG} fit", (FitConfig.__doc__ or "").strip())
        if not config.out:
            raise UsageError("--out EXPERT_DIR is required")
        normals, names = _load_normals(config.normals)
        note(f"fitting on {len(normals)} good image(s), budget {config.minutes:g} min")
        fitted = fit_expert(normals, config, names)
        folder = fitted.save(config.out)
        info = fitted.info
        note(
            f"{info['steps_run']} steps in {info['seconds']['total']:.0f} s; "
            f"calibrated threshold {fitted.calibration.threshold:.3f} (raw score mapped to 0.5)"
        )
        print(folder)
        return 0

    return run_command(f"{PROG} fit", rest, body)


if __name__ == "__main__":
    sys.exit(main())
