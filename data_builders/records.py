"""The one record every reader returns, and the checks that keep bad input out of a build.

Field names follow the project's vocabulary (image_path, gt_label, gt_mask, gt_boxes, defect_type, category,
source, split) so that the same words travel from data files to exports, metrics and the UI. Boxes are
[x1, y1, x2, y2] in ORIGINAL image pixels with exclusive x2/y2 edges, like `anomaly_assistant.finding.Box`.

Bad input never crashes a build and is never dropped silently: every check that rejects a file records
(path, reason) in a `SkipLog`, which the build summary prints and counts.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_assistant.localize import boxes_from_map

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD_NAMES = ("good", "ok", "normal", "nok_free", "defect_free")


@dataclass
class Record:
    """One image with its ground truth. `gt_label` 1 = anomalous; `gt_boxes` in original pixels.

    `group` names the physical source image (a synthesised defect on a normal image shares the group of that
    image) so that dataset splits never put the same source in two splits. `meta` carries reader-specific
    extras (e.g. the reference conversation of VisA-D&R, the MMAD questions) without widening the vocabulary.
    """

    image_path: str
    gt_label: int
    gt_mask: str | None = None
    gt_boxes: list[list[float]] = field(default_factory=list)
    defect_type: str | None = None
    category: str = ""
    source: str = ""
    split: str = ""
    reference_path: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height), filled when the image was opened
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gt_label = int(self.gt_label)
        if not self.group:
            self.group = self.image_path

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_size"] = list(self.image_size) if self.image_size else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("image_size"):
            kwargs["image_size"] = tuple(kwargs["image_size"])
        return cls(**kwargs)


@dataclass
class SkipLog:
    """Everything a reader or a build refused, with the path and the reason (shown in the build summary)."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | os.PathLike, reason: str) -> None:
        self.items.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.items)

    def reasons(self) -> Counter:
        """Counts per reason kind (the text before the first colon)."""
        return Counter(reason.split(":")[0] for _, reason in self.items)

    def extend(self, other: SkipLog) -> None:
        self.items.extend(other.items)

    def format(self, limit: int = 20) -> str:
        lines = [f"skipped {len(self.items)} item(s)"]
        for kind, n in sorted(self.reasons().items()):
            lines.append(f"  {n:6d}  {kind}")
        for path, reason in self.items[:limit]:
            lines.append(f"  - {path}: {reason}")
        if len(self.items) > limit:
            lines.append(f"  … and {len(self.items) - limit} more")
        return "\n".join(lines)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a path names an image by its extension, so folder scans skip any other files they find."""
    return str(path).lower().endswith(IMAGE_EXTS)


def resolve_inside(root: str | os.PathLike, rel: str) -> Path | None:
    """`root/rel` resolved, or None when it escapes `root` (absolute paths, `..`, symlinks out)."""
    base = Path(root).resolve()
    if os.path.isabs(rel):
        target = Path(rel).resolve()
    else:
        target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        return None
    return target


def open_image_checked(path: str | os.PathLike) -> tuple[Image.Image | None, str | None]:
    """Decode an image fully, catching 0-byte, truncated and non-image files.

    Returns (image, None) or (None, reason).
    """
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file: 0 bytes"
        with Image.open(path) as im:
            im.load()  # a truncated file fails here, not at open()
            return im.copy(), None
    except FileNotFoundError:
        return None, "missing file: not found"
    except Exception as exc:  # PIL raises several types for corrupt data
        return None, f"unreadable image: {type(exc).__name__}: {exc}"[:300]


def load_mask(
    path: str | os.PathLike, size: tuple[int, int] | None = None
) -> tuple[np.ndarray | None, str | None]:
    """A boolean mask (non-zero = defect: MVTec 0/255, VisA class indices), checked against the image size.

    A folder of masks (MVTec LOCO: one mask per defect of an image) is read as the union of its masks.
    """
    if os.path.isdir(path):
        parts = sorted(p for p in Path(path).iterdir() if is_image_file(p.name))
        if not parts:
            return None, "bad mask: empty mask folder"
        union = None
        for part in parts:
            m, reason = load_mask(part, size)
            if m is None:
                return None, reason
            union = m if union is None else (union | m if union.shape == m.shape else None)
            if union is None:
                return None, "mask size mismatch: masks in one folder differ in size"
        return union, None
    im, reason = open_image_checked(path)
    if im is None:
        return None, f"bad mask: {reason}"
    if size is not None and im.size != tuple(size):
        return None, f"mask size mismatch: mask {im.size[0]}x{im.size[1]} vs image {size[0]}x{size[1]}"
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return arr > 0, None


def validate_records(
    records: Iterable[Record], skips: SkipLog, boxes_from_masks: bool = True
) -> list[Record]:
    """Open every image (and mask) once, so unreadable input is logged, not discovered mid-training.

    Keeps the readable ones, fills `image_size` and mask boxes, and logs the rest.
    """
    kept = []
    for rec in records:
        im, reason = open_image_checked(rec.image_path)
        if im is None:
            skips.add(rec.image_path, reason or "unreadable image")
            continue
        rec.image_size = im.size
        if rec.gt_mask:
            mask, reason = load_mask(rec.gt_mask, im.size)
            if mask is None:
                skips.add(rec.gt_mask, reason or "bad mask")
                continue
            if boxes_from_masks and not rec.gt_boxes:
                rec.gt_boxes = [b.as_list() for b in boxes_from_map(mask)]
        if rec.reference_path:
            ref, reason = open_image_checked(rec.reference_path)
            if ref is None:
                skips.add(rec.reference_path, f"bad reference: {reason}")
                continue
        kept.append(rec)
    return kept


def summarize(records: Iterable[Record]) -> dict[str, Counter]:
    """Counts per category, defect type, label, split and source (dataset card and CLI summary)."""
    out: dict[str, Counter] = {
        k: Counter() for k in ("category", "defect_type", "gt_label", "split", "source")
    }
    for rec in records:
        out["category"][rec.category or "-"] += 1
        out["defect_type"][rec.defect_type or ("good" if rec.gt_label == 0 else "anomaly")] += 1
        out["gt_label"][rec.gt_label] += 1
        out["split"][rec.split or "-"] += 1
        out["source"][rec.source or "-"] += 1
    return out
