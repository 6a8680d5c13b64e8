"""Stage-1 losses of the anomaly expert, as plain functions.

Anomaly-OV trains the expert with balanced BCE on the image label only. Where pixel masks exist we add focal +
dice on the LTFM map m (AnomalyCLIP-style), with masks area-resized to m's grid (soft targets); an image whose
mask is None contributes only to the image term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .ltfm import resize_map
from .model import ExpertOutput

_EPS = 1e-6


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with both classes weighted equally in the batch: 0.5 mean(normal) + 0.5 mean(anomalous).

    logits, labels: (B,). A batch with one class only falls back to the plain mean over it.
    """
    labels = labels.to(logits).view_as(logits)
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [B]
    pos, neg = labels > 0.5, labels <= 0.5
    terms = [per[mask].mean() for mask in (pos, neg) if mask.any()]
    return torch.stack(terms).mean()


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) binary/soft mask -> (h, w) soft mask in [0, 1] (area fraction of each cell when shrinking)."""
    x = torch.as_tensor(mask, dtype=torch.float32)
    return resize_map(x[None, None], size)[0, 0].clamp(0, 1)


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on probabilities (…,), soft targets allowed; mean over elements."""
    p = prob.clamp(_EPS, 1 - _EPS)
    pt = target * p + (1 - target) * (1 - p)
    ce = -(target * p.log() + (1 - target) * (1 - p).log())
    return ((1 - pt) ** gamma * ce).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss per map (B, h, w), averaged; `smooth` keeps empty masks (normal images) well defined."""
    p, t = prob.flatten(1), target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def stage1_loss(
    outputs: Sequence[ExpertOutput],
    labels: torch.Tensor | Sequence[float],
    masks: Sequence[torch.Tensor | None] | None = None,
    mask_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Stage-1 objective over a batch of expert outputs (forward in training mode, so they carry gradients).

    Returns {"loss", "bce", "focal", "dice"}; focal/dice are 0 when no image in the batch has a mask.
    Reads the raw LTFM fields (`score_logit`, `ltfm_map`), never the published (possibly fused) ones.
    """
    logits = torch.stack([o.score_logit for o in outputs])  # [B]
    labels_t = torch.as_tensor(labels, dtype=logits.dtype, device=logits.device)
    bce = balanced_bce(logits, labels_t)
    zero = logits.new_zeros(())
    focal, dice = zero, zero
    if masks is not None:
        have = [(o, m) for o, m in zip(outputs, masks) if m is not None]
        if have:
            probs = [o.ltfm_map for o, _ in have]  # each [h, w]
            targets = [resize_mask(m, tuple(p.shape)).to(p) for p, (_, m) in zip(probs, have)]
            focal = torch.stack([focal_loss(p, t) for p, t in zip(probs, targets)]).mean()
            dice = torch.stack([dice_loss(p[None], t[None]) for p, t in zip(probs, targets)]).mean()
    loss = bce + mask_weight * (focal + dice)
    return {"loss": loss, "bce": bce, "focal": focal, "dice": dice}
