"""The one picture of a Finding: the part with its anomaly heat, numbered boxes, verdict, score, colour scale.

Used by `inspect --save-maps`, evaluation reports and the inspector UI alike, so an inspector sees the same
picture everywhere. Choices that keep it readable on any part (dark PCBs, grey tiles, colour photos):

- the heat is drawn only where it stands out: its opacity ramps from 0 at the map's median to `max_alpha` at
  its peak (a map flatter than 0.25 never reaches full opacity), so normal surface keeps its own look instead
  of a uniform colour wash, and a hot spot shows even when it stays below the threshold;
- the colour is absolute: a calibrated map value of 0.8 has the same colour on every image, and the colour bar
  says so, with the decision threshold marked on it. The ramp is saturated at both ends (blue -> cyan -> green
  -> yellow -> red, the bright middle of matplotlib's "turbo"), so it contrasts with grey, black and white
  parts;
- boxes are white with a black edge and a numbered tag, visible on black and on white;
- a header states the verdict (red / green badge), the score and the defect type.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .finding import Finding
from .localize import DEFAULT_THRESHOLD

# Anchor colours of the ramp, evenly spaced over [0, 1]: matplotlib's "turbo" sampled from 0.125 to 0.875.
_RAMP_RGB = np.array(
    [[70, 107, 227], [40, 188, 235], [50, 242, 152], [164, 252, 60], [238, 207, 58], [251, 126, 33],
     [208, 47, 5]], dtype=np.float32
)
_RAMP_STOPS = np.linspace(0.0, 1.0, len(_RAMP_RGB), dtype=np.float32)
_FLAT_SPREAD = 0.25  # a map whose peak stands less than this above its median is drawn fainter
_ANOMALOUS_RGB, _NORMAL_RGB, _UNKNOWN_RGB = (200, 30, 30), (30, 140, 60), (110, 110, 110)


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """(...,) values in [0, 1] -> (..., 3) uint8 RGB on the overlay's colour ramp (NaN counts as 0)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    rgb = np.stack([np.interp(x, _RAMP_STOPS, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _display_scale(size: tuple[int, int], min_side: int, max_side: int) -> float:
    """Scale so the longer side is at least `min_side` (small crops stay legible) and at most `max_side`."""
    longest = max(size)
    if longest < min_side:
        return min_side / longest
    if longest > max_side:
        return max_side / longest
    return 1.0


def _heat(base: Image.Image, anomaly_map: np.ndarray, max_alpha: float) -> Image.Image:
    amap = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32))
    heat = Image.fromarray(amap).resize(base.size, Image.BILINEAR)
    values = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    low = float(np.median(values))
    high = max(float(values.max()), low + _FLAT_SPREAD)
    alpha = np.clip((values - low) / (high - low), 0.0, 1.0) ** 0.75 * max_alpha  # [H, W]
    rgb = np.asarray(base, dtype=np.float32)
    blended = rgb * (1.0 - alpha[..., None]) + colour_ramp(values).astype(np.float32) * alpha[..., None]
    return Image.fromarray(blended.round().astype(np.uint8))


def _draw_boxes(draw: ImageDraw.ImageDraw, finding: Finding, scale: float, size: tuple[int, int]) -> None:
    width = max(2, round(min(size) / 200))
    font = _font(max(12, round(min(size) / 30)))
    for number, box in enumerate(finding.boxes, start=1):
        x1, y1, x2, y2 = (v * scale for v in box.as_list())
        rect = [x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)]
        draw.rectangle(rect, outline=(0, 0, 0), width=width + 2)
        draw.rectangle(rect, outline=(255, 255, 255), width=width)
        tag = str(number)
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tw, th = right - left + 6, bottom - top + 6
        tx = min(max(0.0, x1), size[0] - tw)
        ty = y1 - th if y1 - th >= 0 else min(y1 + width, size[1] - th)
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=(255, 255, 255), outline=(0, 0, 0))
        draw.text((tx + 3 - left, ty + 3 - top), tag, fill=(0, 0, 0), font=font)


def _header(finding: Finding, width: int) -> Image.Image:
    font = _font(18)
    bar = Image.new("RGB", (width, 34), (25, 25, 25))
    draw = ImageDraw.Draw(bar)
    verdict = (finding.verdict or "unknown").upper()
    colour = {"ANOMALOUS": _ANOMALOUS_RGB, "NORMAL": _NORMAL_RGB}.get(verdict, _UNKNOWN_RGB)
    left, top, right, bottom = draw.textbbox((0, 0), verdict, font=font)
    draw.rectangle([6, 5, 6 + right - left + 14, 29], fill=colour)
    draw.text((13 - left, 17 - (bottom + top) / 2), verdict, fill=(255, 255, 255), font=font)
    parts = []
    if finding.score is not None:
        parts.append(f"score {finding.score:.3f}")  # 0.495 must not read as the 0.50 cut
    if finding.defect_type:
        parts.append(finding.defect_type)
    text = "  ·  ".join(parts)
    room = width - (right - left) - 32
    while parts and draw.textlength(text, font=font) > room:  # a narrow image: drop the last detail
        parts.pop()
        text = "  ·  ".join(parts)
    draw.text((6 + right - left + 26, 17 - (bottom + top) / 2), text, fill=(235, 235, 235), font=font)
    return bar


def _colour_bar(height: int, threshold: float) -> Image.Image:
    font = _font(14)
    strip_w, width, pad = 18, 96, 12
    panel = Image.new("RGB", (width, height), (25, 25, 25))
    inner = max(height - 2 * pad, 2)
    ramp = colour_ramp(np.linspace(1.0, 0.0, inner))[:, None, :].repeat(strip_w, axis=1)  # top = 1
    panel.paste(Image.fromarray(ramp), (8, pad))
    draw = ImageDraw.Draw(panel)
    draw.rectangle([8, pad, 8 + strip_w - 1, pad + inner - 1], outline=(200, 200, 200))
    for value, label in ((1.0, "1.0"), (threshold, f"{threshold:.2f} cut"), (0.0, "0.0")):
        y = pad + (1.0 - value) * (inner - 1)
        colour = (255, 255, 255) if label.endswith("cut") else (200, 200, 200)
        draw.line([(4, y), (8 + strip_w + 3, y)], fill=colour, width=2 if label.endswith("cut") else 1)
        draw.text((8 + strip_w + 6, y), label, fill=colour, font=font, anchor="lm")
    return panel


def render_overlay(image: Image.Image, finding: Finding, threshold: float = DEFAULT_THRESHOLD,
                   max_alpha: float = 0.7, min_side: int = 384, max_side: int = 1024) -> Image.Image:
    """The finding drawn on its image: heat (where a map exists), numbered boxes, verdict header, colour bar.

    `finding` coordinates are in `image`'s original pixels; the picture is scaled for display (see
    `_display_scale`), so it is for people, not for measuring.
    """
    scale = _display_scale(image.size, min_side, max_side)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
    if finding.anomaly_map is not None and np.asarray(finding.anomaly_map).ndim == 2:
        base = _heat(base, finding.anomaly_map, max_alpha)
    _draw_boxes(ImageDraw.Draw(base), finding, scale, size)
    header = _header(finding, size[0] + 96)
    canvas = Image.new("RGB", (size[0] + 96, size[1] + header.height), (25, 25, 25))
    canvas.paste(header, (0, 0))
    canvas.paste(base, (0, header.height))
    if finding.anomaly_map is not None:
        canvas.paste(_colour_bar(size[1], threshold), (size[0], header.height))
    return canvas
