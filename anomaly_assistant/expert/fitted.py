"""A fitted expert: a trained LTFM + score head fused with a reference bank, with a calibrated verdict.

`anomaly-assistant expert fit` (training lives in `train/expert_fit.py`) adapts the expert to one part from a
few good images; this module is what the product loads and runs (no data synthesis, no training imports).

One folder holds everything the fitted expert needs:

    expert_config.json + expert.safetensors   the trained AnomalyExpert (`AnomalyExpert.save_pretrained`)
    references/ref_000.png ...                the good images it was fitted on (lossless copies)
    fit.json                                  calibration, screener settings and what it was fitted on

The reference bank is rebuilt from the saved references on load (deterministic; 1-3 s for four references),
so a reloaded expert gives identical maps without pickling the bank.

Features: EfficientNet-Lite0 levels of the image after the screener's own illumination and scale steps, so the
LTFM and the bank see the same pixels; v° is every level resized to the finest grid and concatenated
(`expert_inputs`), so the map keeps the stride-8 resolution instead of the coarse stride-16 one.

Calibration (what 0.5 means): the fused score s = (1 - w) sigmoid(head) + w reference_score is mapped by a
monotone piecewise-linear function that sends the fitted threshold t to 0.5 (0 -> 0, 1 -> 1). At fit time t is
chosen on held-out views the LTFM never trained on: augmented copies of the normals (their reference cue
matched against a bank WITHOUT that normal when k >= 2) and synthetic defects on them; t is the middle of the
interval of cut points with the best balanced accuracy. So 0.5 means "halfway between what unseen views of
the normals and synthetic defects scored". The same map is applied to every pixel of the anomaly map.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomaly_assistant.expert.config import ExpertConfig
from anomaly_assistant.expert.model import AnomalyExpert, ExpertOutput
from anomaly_assistant.expert.reference import (
    ReferenceScreener,
    ScreenerConfig,
    ScreenResult,
    normalize_illumination,
    upsample_map,
)
from anomaly_assistant.expert.sources import EfficientNetLite0Config, EfficientNetLite0Source, resize_grid
from anomaly_assistant.localize import DEFAULT_THRESHOLD, is_anomalous

FIT_NAME = "fit.json"
REFERENCE_DIR = "references"


def efficientnet_expert_config(**overrides: Any) -> ExpertConfig:
    """A CPU-sized expert on EfficientNet-Lite0 blocks 4 and 10 (40 + 112 channels; v° = both, 152)."""
    source = {"image_size": 256, "blocks": [4, 10], "pad": 32}
    source.update(overrides.pop("source_options", {}))
    dims = [{4: 40, 10: 112}.get(b) or _block_channels(b) for b in source["blocks"]]
    base: dict[str, Any] = {
        "feature_source": "efficientnet_lite0",
        "source_options": source,
        "level_dims": dims,
        "token_dim": sum(dims),
        "embed_dim": 64,
        "class_code_dim": 64,
        "lookback_grid": 8,
        "logit_scale": 10.0,
    }
    return ExpertConfig(**{**base, **overrides})


def _block_channels(block: int) -> int:
    from anomaly_assistant.expert.sources import EFFNET_LITE0_BLOCKS

    return EFFNET_LITE0_BLOCKS[block][1]


def build_source(config: ExpertConfig) -> EfficientNetLite0Source:
    """The frozen feature source the expert was trained on (rebuilt from `config.source_options`)."""
    if config.feature_source != "efficientnet_lite0":
        raise ValueError(
            "a fitted expert reads EfficientNet-Lite0 features (feature_source efficientnet_lite0)"
        )
    opts = dict(config.source_options)
    if "blocks" in opts:
        opts["blocks"] = tuple(opts["blocks"])
    return EfficientNetLite0Source(EfficientNetLite0Config(**opts))


def expert_inputs(levels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Level grids [(H_l, W_l, C_l)] -> (levels, v°) with v° = all levels on the finest grid, concatenated."""
    target = max((g.shape[0] * g.shape[1], tuple(g.shape[:2])) for g in levels)[1]
    v0 = torch.cat([resize_grid(g, target) for g in levels], dim=-1)  # [H, W, sum C_l]
    return list(levels), v0


def extract(source: Any, images: Sequence[Image.Image], illumination: str, scale: float | None) -> list:
    """Images -> per image (levels, v°), after the same illumination step and scale as the reference bank."""
    prepped = [normalize_illumination(im, illumination) for im in images]
    return [expert_inputs(lv) for lv in source(prepped, scale=scale)]


@dataclass
class Calibration:
    """Monotone map of a fused score in [0, 1] that sends `threshold` to 0.5 (see the module docstring)."""

    threshold: float = 0.5

    def __call__(self, x: torch.Tensor | float) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32).clamp(0, 1)
        t = min(max(float(self.threshold), 1e-4), 1 - 1e-4)
        return torch.where(x < t, 0.5 * x / t, 0.5 + 0.5 * (x - t) / (1 - t))

    @classmethod
    def fit(cls, normal_scores: Sequence[float], defect_scores: Sequence[float]) -> Calibration:
        """The middle of the widest-margin run of cut points with the best balanced accuracy."""
        n = np.sort(np.asarray(normal_scores, dtype=np.float64))
        d = np.sort(np.asarray(defect_scores, dtype=np.float64))
        if not len(n) or not len(d):
            raise ValueError("calibration needs normal and defect scores")
        values = np.unique(np.concatenate([n, d, [0.0, 1.0]]))
        cuts = (values[:-1] + values[1:]) / 2  # candidate thresholds between observed scores
        bal = 0.5 * (
            np.searchsorted(n, cuts, side="left") / len(n)  # normals below the cut
            + (len(d) - np.searchsorted(d, cuts, side="left")) / len(d)
        )  # defects at or above
        best = np.flatnonzero(bal >= bal.max() - 1e-12)
        lo, hi = values[best[0]], values[best[-1] + 1]  # the interval of equally good cuts
        return cls(float((lo + hi) / 2))


class FittedExpert:
    """Trained expert + reference bank + calibration for one part; `predict` like a `ReferenceScreener`."""

    map_source = "fitted expert (trained LTFM fused with reference matching)"

    def __init__(
        self,
        expert: AnomalyExpert,
        screener: ReferenceScreener,
        calibration: Calibration,
        info: dict[str, Any] | None = None,
        references: Sequence[Image.Image] = (),
    ):
        self.expert = expert.eval()
        self.screener = screener
        self.calibration = calibration
        self.info = dict(info or {})
        self.references = [im.copy() for im in references]

    @property
    def source(self) -> Any:
        return self.screener.source

    def features(self, images: Sequence[Image.Image]) -> list:
        """Per image (levels, v°) as the expert and the bank read them."""
        return extract(self.source, images, self.screener.config.illumination, self.screener.scale)

    @torch.no_grad()
    def outputs(self, images: Sequence[Image.Image], reference: bool = True) -> list[ExpertOutput]:
        """Raw expert outputs (LTFM fused with the bank's cue unless reference=False), on the v° grid."""
        feats = self.features(images)
        bank = self.screener.bank if reference else None
        return [
            o.detach()
            for o in self.expert.forward_batch(
                [f[0] for f in feats], [f[1] for f in feats], bank, use_ltfm=True
            )
        ]

    def predict(
        self, images: Sequence[Image.Image], threshold: float = DEFAULT_THRESHOLD
    ) -> list[ScreenResult]:
        """Calibrated score, map at each image's original (H, W) and label at `threshold`."""
        out = []
        for im, o in zip(images, self.outputs(images)):
            raw = float(o.score)
            score = float(self.calibration(raw))
            amap = self.calibration(upsample_map(o.anomaly_map.float(), (im.size[1], im.size[0])))
            out.append(
                ScreenResult(score, amap.numpy().astype(np.float32), is_anomalous(score, threshold), raw)
            )
        return out

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the expert, the references (PNG) and fit.json into `directory`."""
        d = Path(directory)
        self.expert.save_pretrained(d)
        ref_dir = d / REFERENCE_DIR
        ref_dir.mkdir(parents=True, exist_ok=True)
        for old in ref_dir.glob("ref_*.png"):
            old.unlink()
        for i, im in enumerate(self.references):
            im.save(ref_dir / f"ref_{i:03d}.png")
        screener = asdict(self.screener.config)
        payload = {
            **self.info,
            "calibration": asdict(self.calibration),
            "screener": screener,
            "references": [f"{REFERENCE_DIR}/ref_{i:03d}.png" for i in range(len(self.references))],
        }
        (d / FIT_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, source: Any = None) -> FittedExpert:
        """Rebuild from `save`'s folder; the bank is refitted on the saved references (no pickle)."""
        d = Path(directory)
        if not (d / FIT_NAME).is_file():
            raise FileNotFoundError(
                f"{d} is not a fitted expert (no {FIT_NAME}; `anomaly-assistant expert fit`)"
            )
        info = json.loads((d / FIT_NAME).read_text())
        expert = AnomalyExpert.from_pretrained(d)
        source = source or build_source(expert.config)
        refs = [Image.open(d / p).copy() for p in info["references"]]
        settings = dict(info["screener"])
        # saved before `held_out_profile` existed: its calibration was fitted to the in-sample bank scale
        settings["bank"] = {"held_out_profile": False, **(settings.get("bank") or {})}
        screener = ReferenceScreener(source, ScreenerConfig.from_dict(settings)).fit(refs)
        calibration = Calibration(**info["calibration"])
        rest = {k: v for k, v in info.items() if k not in ("calibration", "screener", "references")}
        return cls(expert, screener, calibration, rest, refs)
