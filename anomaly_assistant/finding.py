"""What an inspection returns: `Finding`, `Box`, and the `Frame` between model input and original image.

Coordinates in a `Finding` are always in ORIGINAL image pixels (x right, y down, x2/y2 exclusive edges).
The model speaks in its own input frame (e.g. Qwen2.5-VL's smart-resized pixels); `Frame` is the one
place that converts between the two, so the grammar, the data builders and the UI cannot disagree.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from anomaly_assistant.scoring import box_iou

Verdict = Literal["normal", "anomalous"]
VERDICTS: tuple[str, str] = ("normal", "anomalous")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box [x1, y1, x2, y2] with an optional label and confidence."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    score: float | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def clip(self, width: float, height: float) -> Box:
        return Box(
            min(max(self.x1, 0.0), width), min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width), min(max(self.y2, 0.0), height),
            self.label, self.score,
        )

    def iou(self, other: Box) -> float:
        return box_iou(self.as_list(), other.as_list())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"box": self.as_list()}
        if self.label is not None:
            out["label"] = self.label
        if self.score is not None:
            out["score"] = self.score
        return out

    @classmethod
    def from_json(cls, data: Any) -> Box:
        if isinstance(data, dict):
            x1, y1, x2, y2 = (float(v) for v in data["box"])
            return cls(x1, y1, x2, y2, data.get("label"), data.get("score"))
        x1, y1, x2, y2 = (float(v) for v in data)
        return cls(x1, y1, x2, y2)


@dataclass(frozen=True)
class Frame:
    """Affine map from original image pixels to a backbone's model-input pixels.

    input = original * scale - offset (per axis). Covers plain resizes (Qwen2.5-VL smart-resize,
    LLaVA-OneVision's squashed base view) and resize + centre-crop (LLaVA-1.5 CLIP). Scales and
    offsets are exact rationals so a conversion there and back is exact before the final float.
    """

    original_size: tuple[int, int]  # (width, height) of the image the user gave
    input_size: tuple[int, int]  # (width, height) of the image the model sees
    scale: tuple[Fraction, Fraction]
    offset: tuple[Fraction, Fraction] = (Fraction(0), Fraction(0))

    @classmethod
    def resize(cls, original_size: tuple[int, int], input_size: tuple[int, int]) -> Frame:
        """A plain (possibly aspect-changing) resize of the whole image."""
        (w, h), (iw, ih) = original_size, input_size
        if min(w, h, iw, ih) <= 0:
            raise ValueError(f"image sizes must be positive, got {original_size} -> {input_size}")
        return cls((w, h), (iw, ih), (Fraction(iw, w), Fraction(ih, h)))

    @classmethod
    def resize_then_center_crop(
        cls, original_size: tuple[int, int], resized_size: tuple[int, int], crop_size: tuple[int, int]
    ) -> Frame:
        """Resize to `resized_size`, then take the central `crop_size` window (CLIP-style preprocessing)."""
        (w, h), (rw, rh), (cw, ch) = original_size, resized_size, crop_size
        if min(w, h, rw, rh, cw, ch) <= 0:
            raise ValueError("image sizes must be positive")
        # Same rounding as the image processors' centre crop: top-left = floor((resized - crop) / 2).
        off = (Fraction((rw - cw) // 2), Fraction((rh - ch) // 2))
        return cls((w, h), (cw, ch), (Fraction(rw, w), Fraction(rh, h)), off)

    def _map(self, x: float, y: float, inverse: bool) -> tuple[float, float]:
        fx, fy = Fraction(x), Fraction(y)
        if inverse:
            return float((fx + self.offset[0]) / self.scale[0]), float((fy + self.offset[1]) / self.scale[1])
        return float(fx * self.scale[0] - self.offset[0]), float(fy * self.scale[1] - self.offset[1])

    def to_original(self, box: Box, clip: bool = True) -> Box:
        """Model-input pixels -> original pixels."""
        x1, y1 = self._map(box.x1, box.y1, inverse=True)
        x2, y2 = self._map(box.x2, box.y2, inverse=True)
        out = Box(x1, y1, x2, y2, box.label, box.score)
        return out.clip(*self.original_size) if clip else out

    def to_input(self, box: Box, clip: bool = True) -> Box:
        """Original pixels -> model-input pixels (what SFT targets and GRPO solutions use)."""
        x1, y1 = self._map(box.x1, box.y1, inverse=False)
        x2, y2 = self._map(box.x2, box.y2, inverse=False)
        out = Box(x1, y1, x2, y2, box.label, box.score)
        return out.clip(*self.input_size) if clip else out

    def to_json(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "input_size": list(self.input_size),
            "scale": [str(s) for s in self.scale],
            "offset": [str(o) for o in self.offset],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Frame:
        return cls(
            tuple(data["original_size"]), tuple(data["input_size"]),  # type: ignore[arg-type]
            tuple(Fraction(s) for s in data["scale"]),  # type: ignore[arg-type]
            tuple(Fraction(o) for o in data.get("offset", ["0", "0"])),  # type: ignore[arg-type]
        )


def _encode_map(anomaly_map: np.ndarray) -> dict[str, Any]:
    buf = io.BytesIO()
    np.save(buf, np.asarray(anomaly_map, dtype=np.float32), allow_pickle=False)
    return {"npy_base64": base64.b64encode(buf.getvalue()).decode("ascii")}


def _decode_map(data: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["npy_base64"])
    return np.load(io.BytesIO(raw), allow_pickle=False)


_LEGACY_MAP_NOTE = "map source: "


def split_legacy_map_source(data: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(map_source, notes) of a Finding's JSON, also for JSON written before `map_source` was a field.

    Such JSON (older `--json` output, older server records) has no "map_source" key and carries the tag
    as a note "map source: X" instead; that note becomes the field and leaves the notes.
    """
    notes = [str(n) for n in data.get("notes") or []]
    if "map_source" in data:
        return data["map_source"], notes
    tags = [n.removeprefix(_LEGACY_MAP_NOTE) for n in notes if n.startswith(_LEGACY_MAP_NOTE)]
    return (tags[0] if tags else None), [n for n in notes if not n.startswith(_LEGACY_MAP_NOTE)]


@dataclass
class Finding:
    """One structured answer about one image.

    `verdict`/`score` are the decision (score in [0, 1], higher = more anomalous); `boxes` are in
    original pixels; `anomaly_map` is an (H, W) float32 array in [0, 1] at the original resolution
    when the expert produced one. `parse_error` records why the model's text did not parse (then the
    verdict and map come from the expert); `source` says who decided ("model" or "expert").
    `map_source` says where the anomaly map came from: the expert's tag ("reference" = matched against the
    reference images, "ltfm" = the trained expert, "ltfm+reference" = both, or a fitted expert's own
    description); None when there is no map.
    """

    verdict: Verdict = "normal"
    score: float | None = None
    boxes: list[Box] = field(default_factory=list)
    defect_type: str | None = None
    rationale: str = ""
    think: str = ""
    anomaly_map: np.ndarray | None = None
    raw_text: str = ""
    parse_error: str | None = None
    source: str = "model"
    image_size: tuple[int, int] | None = None  # (width, height)
    image_path: str | None = None
    notes: list[str] = field(default_factory=list)  # plain-language caveats (e.g. "no anomaly map: ...")
    map_source: str | None = None  # where `anomaly_map` came from ("reference", "ltfm", ...); None: no map

    @property
    def is_anomalous(self) -> bool:
        return self.verdict == "anomalous"

    @property
    def pred_label(self) -> int:
        """The record vocabulary's name for the verdict (1 = anomalous)."""
        return int(self.is_anomalous)

    def to_json(self, include_map: bool = True) -> dict[str, Any]:
        score = self.score
        if score is not None and not math.isfinite(score):
            score = None
        out: dict[str, Any] = {
            "image": self.image_path,
            "verdict": self.verdict,
            "score": score,
            "boxes": [b.as_list() for b in self.boxes],
            "box_labels": [b.label for b in self.boxes],
            "defect_type": self.defect_type,
            "rationale": self.rationale,
            "think": self.think,
            "raw_text": self.raw_text,
            "parse_error": self.parse_error,
            "source": self.source,
            "image_size": list(self.image_size) if self.image_size else None,
            "notes": list(self.notes),
            "map_source": self.map_source,
        }
        if include_map and self.anomaly_map is not None:
            out["anomaly_map"] = _encode_map(self.anomaly_map)
        return out

    def dumps(self, include_map: bool = True) -> str:
        return json.dumps(self.to_json(include_map=include_map), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        labels = data.get("box_labels") or []
        boxes = []
        for i, b in enumerate(data.get("boxes") or []):
            box = Box.from_json(b)
            if i < len(labels) and labels[i] is not None and box.label is None:
                box = Box(box.x1, box.y1, box.x2, box.y2, labels[i], box.score)
            boxes.append(box)
        amap = data.get("anomaly_map")
        size = data.get("image_size")
        map_source, notes = split_legacy_map_source(data)
        return cls(
            verdict=data.get("verdict", "normal"),
            score=data.get("score"),
            boxes=boxes,
            defect_type=data.get("defect_type"),
            rationale=data.get("rationale", "") or "",
            think=data.get("think", "") or "",
            anomaly_map=_decode_map(amap) if isinstance(amap, dict) else None,
            raw_text=data.get("raw_text", "") or "",
            parse_error=data.get("parse_error"),
            source=data.get("source", "model"),
            image_size=tuple(size) if size else None,  # type: ignore[arg-type]
            image_path=data.get("image"),
            notes=notes,
            map_source=map_source,
        )

    @classmethod
    def loads(cls, text: str) -> Finding:
        return cls.from_json(json.loads(text))


def location_words(box: Sequence[float], size: tuple[int, int]) -> str:
    """Where a box sits, in words (e.g. "upper left", "centre", "right edge")."""
    w, h = size
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    vert = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "")
    horiz = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "")
    if not vert and not horiz:
        return "centre"
    if vert and horiz:
        return f"{vert} {horiz}"
    return f"{vert or 'middle'} part" if vert else f"{horiz} side"


def size_words(box: Sequence[float], size: tuple[int, int]) -> str:
    """A size word from a box's share of the image, so texts say "small scratch" rather than pixel counts."""
    frac = (box[2] - box[0]) * (box[3] - box[1]) / max(1, size[0] * size[1])
    return "tiny" if frac < 0.002 else "small" if frac < 0.02 else "medium-sized" if frac < 0.1 else "large"


def boxes_in_frame(boxes: Sequence[Sequence[float]], frame: Frame) -> list[list[int]]:
    """Original-pixel boxes -> integer boxes in the model-input frame (outward rounding; empty ones dropped).

    What training targets and expert-written answer fields use.
    """
    out = []
    for b in boxes:
        m = frame.to_input(Box(*map(float, b[:4])))
        x1, y1 = math.floor(m.x1), math.floor(m.y1)
        x2, y2 = max(math.ceil(m.x2), x1 + 1), max(math.ceil(m.y2), y1 + 1)
        iw, ih = frame.input_size
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(iw, x2), min(ih, y2)
        if x2 > x1 and y2 > y1:
            out.append([x1, y1, x2, y2])
    return out
