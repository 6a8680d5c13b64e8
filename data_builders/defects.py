"""Defect synthesis on any normal image: each defect comes with its exact pixel mask.

Eight families, each a plain function `(image, rng, region) -> (image, alpha)` on float32 RGB arrays:
cut-paste (CutPaste), scratch, crack, stain / colour blob, hole, missing part, foreign object and a
Perlin-noise texture blend (DRAEM). `synthesize` picks one, places it inside an optional `region` (an
object's foreground) and returns a `Defect` with the image, the boolean mask (alpha > 0.5), its boxes
and the defect type. Works on real photographs (the real-dev good images, scikit-image's bundled CC0
textures) as well as on SynthInspect renders, so realistic training data exists without any download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from anomaly_assistant.localize import boxes_from_map

DEFECT_KINDS = (
    "cut_paste",
    "scratch",
    "crack",
    "stain",
    "hole",
    "missing_part",
    "foreign_object",
    "perlin_blend",
)
# the defect_type written into records for each synthesiser (snake_case like MVTec's folder names)
DEFECT_TYPE_NAMES = {
    "cut_paste": "misplaced_patch",
    "scratch": "scratch",
    "crack": "crack",
    "stain": "stain",
    "hole": "hole",
    "missing_part": "missing_part",
    "foreign_object": "foreign_object",
    "perlin_blend": "surface_irregularity",
}
SKIMAGE_TEXTURES = ("brick.png", "grass.png", "gravel.png")  # CC0, shipped inside scikit-image's wheel


@dataclass
class Defect:
    """A synthesised anomaly.

    The altered image (uint8 HxWx3), its mask (bool HxW) and boxes (original pixels).
    """

    image: np.ndarray
    mask: np.ndarray
    defect_type: str
    kind: str
    boxes: list[list[float]] = field(default_factory=list)


def skimage_texture_paths() -> list[Path]:
    """Paths of the CC0 texture photographs bundled with scikit-image (no download)."""
    import skimage.data

    base = Path(skimage.data.__file__).parent
    return [base / n for n in SKIMAGE_TEXTURES if (base / n).is_file()]


# --------------------------------------------------------------------------------------------- noise & shapes


def smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int = 4, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in [0, 1], shape [H, W]: a fast Perlin-like field.

    Sums bicubic-upsampled random lattices over `octaves`.
    """
    acc = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = cells * (2**o)
        lattice = rng.random((c + 1, c + 1), dtype=np.float32)
        acc += amp * np.asarray(Image.fromarray(lattice, mode="F").resize((w, h), Image.BICUBIC))
        total += amp
        amp *= 0.5
    acc /= total
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / max(hi - lo, 1e-6)


def yx_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Open float32 coordinate grids: y [H, 1], x [1, W] (broadcast instead of materialising H×W twice)."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def grow_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean mask by `radius` pixels (square).

    Two separable 1-D max filters keep it fast at any radius.
    """
    from scipy.ndimage import maximum_filter1d

    m = mask.astype(np.uint8)
    m = maximum_filter1d(maximum_filter1d(m, 2 * radius + 1, axis=0), 2 * radius + 1, axis=1)
    return m > 0


def _pick_center(
    h: int, w: int, rng: np.random.Generator, region: np.ndarray | None, margin: float = 0.1
) -> tuple[int, int]:
    if region is not None and region.any():
        ys, xs = np.nonzero(region)
        i = int(rng.integers(len(ys)))
        return int(xs[i]), int(ys[i])
    mx, my = int(w * margin), int(h * margin)
    return int(rng.integers(mx, max(mx + 1, w - mx))), int(rng.integers(my, max(my + 1, h - my)))


def _blob(
    h: int, w: int, cx: float, cy: float, rx: float, ry: float, rng: np.random.Generator, rough: float = 0.35
) -> np.ndarray:
    """An irregular filled blob around (cx, cy) with radii (rx, ry), [H, W] float 0..1.

    An ellipse warped by smooth noise, so synthesised stains and holes do not look stamped.
    """
    yy, xx = yx_grid(h, w)
    angle = rng.uniform(0, math.pi)
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = (dx * ca + dy * sa) / max(rx, 1.0), (-dx * sa + dy * ca) / max(ry, 1.0)
    dist = np.sqrt(u * u + v * v)
    dist = (
        dist
        + rough * (smooth_noise(h, w, rng, cells=max(2, int(w / max(rx, 1.0) / 1.5)), octaves=2) - 0.5) * 2
    )
    return np.clip((1.0 - dist) * 4.0, 0.0, 1.0)


def _polyline(
    cx: float, cy: float, length: float, rng: np.random.Generator, wiggle: float, step: float = 4.0
):
    """A random-walk curve centred near (cx, cy)."""
    n = max(3, int(length / step))
    heading = rng.uniform(0, 2 * math.pi)
    turns = rng.normal(0, wiggle, n)
    pts = [(0.0, 0.0)]
    for t in turns:
        heading += t
        x, y = pts[-1]
        pts.append((x + step * math.cos(heading), y + step * math.sin(heading)))
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return [(cx + x - mx, cy + y - my) for x, y in pts]


def _stroke_alpha(
    h: int, w: int, lines: list[list[tuple[float, float]]], widths: list[int], blur: float = 0.6
) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, width in zip(lines, widths):
        draw.line(pts, fill=255, width=max(1, int(width)), joint="curve")
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _soften(alpha: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return alpha
    im = Image.fromarray((np.clip(alpha, 0, 1) * 255).astype(np.uint8), mode="L").filter(
        ImageFilter.GaussianBlur(radius)
    )
    return np.asarray(im, dtype=np.float32) / 255.0


def _background_colour(img: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    if region is not None and (~region).any():
        return np.median(img[~region], axis=0)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _composite(img: np.ndarray, alpha: np.ndarray, paint: np.ndarray) -> np.ndarray:
    a = alpha[..., None]  # [H, W, 1]
    return img * (1.0 - a) + paint * a


# ---------------------------------------------------------------------------------------- defect families


def scratch(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """A thin, gently curved line, brighter or darker than the surface (tool marks, handling)."""
    h, w = img.shape[:2]
    s = min(h, w)
    cx, cy = _pick_center(h, w, rng, region)
    pts = _polyline(cx, cy, rng.uniform(0.2, 0.5) * s, rng, wiggle=0.08, step=max(2.0, s / 64))
    alpha = _stroke_alpha(h, w, [pts], [max(1, int(s / rng.uniform(90, 160)))], blur=0.5)
    bright = rng.random() < 0.5
    paint = np.clip(img * (1.5 if bright else 0.35) + (60 if bright else 0), 0, 255)
    return _composite(img, alpha * rng.uniform(0.75, 1.0), paint), alpha


def crack(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """A dark, jagged, branching fracture line."""
    h, w = img.shape[:2]
    s = min(h, w)
    cx, cy = _pick_center(h, w, rng, region)
    main = _polyline(cx, cy, rng.uniform(0.25, 0.55) * s, rng, wiggle=0.45, step=max(2.0, s / 48))
    lines, widths = [main], [max(1, int(s / 100))]
    for _ in range(int(rng.integers(1, 4))):
        bx, by = main[int(rng.integers(len(main)))]
        branch = _polyline(bx, by, rng.uniform(0.05, 0.15) * s, rng, wiggle=0.5, step=max(2.0, s / 64))
        shift = (bx - branch[0][0], by - branch[0][1])
        lines.append([(x + shift[0], y + shift[1]) for x, y in branch])
        widths.append(1)
    alpha = _stroke_alpha(h, w, lines, widths, blur=0.4)
    return _composite(img, alpha * 0.95, img * 0.15), alpha


def stain(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """A soft-edged blob of different colour (oil, rust, discolouration)."""
    h, w = img.shape[:2]
    s = min(h, w)
    cx, cy = _pick_center(h, w, rng, region)
    r = rng.uniform(0.04, 0.12) * s
    alpha = _soften(_blob(h, w, cx, cy, r, r * rng.uniform(0.5, 1.0), rng, rough=0.5), 1.0)
    palette = np.array([[90, 60, 30], [150, 90, 40], [40, 40, 40], [170, 160, 60], [120, 40, 40]], np.float32)
    colour = palette[int(rng.integers(len(palette)))]
    local = float(img[max(0, cy - 8) : cy + 8, max(0, cx - 8) : cx + 8].mean())
    if local < 90:  # on a dark surface a stain shows as a lighter residue
        colour = np.clip(colour * 1.6 + 50, 0, 255)
    paint = 0.45 * img + 0.55 * colour
    return _composite(img, alpha * rng.uniform(0.6, 0.9), paint), alpha


def hole(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """A small dark pit with a lit rim (blowhole, pin-hole, poke)."""
    h, w = img.shape[:2]
    s = min(h, w)
    cx, cy = _pick_center(h, w, rng, region)
    r = rng.uniform(0.015, 0.05) * s + 1.5
    yy, xx = yx_grid(h, w)
    d = np.sqrt((xx - cx) ** 2 + ((yy - cy) / rng.uniform(0.7, 1.0)) ** 2) / r
    alpha = np.clip((1.15 - d) * 5.0, 0, 1)
    rim = np.clip(1.0 - np.abs(d - 1.0) * 4.0, 0, 1) * (yy < cy)  # light catches the upper rim
    out = _composite(img, alpha, img * 0.12 + 8)
    out = _composite(out, rim * 0.35, np.full_like(img, 235))
    return out, alpha


def missing_part(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """A chunk replaced by background (broken edge, chipped corner, missing component)."""
    h, w = img.shape[:2]
    s = min(h, w)
    if region is not None and region.any():
        # bite into the object's outline: centre on a boundary pixel of the region
        from scipy import ndimage

        edge = region & ~ndimage.binary_erosion(region, iterations=2)
        cx, cy = _pick_center(h, w, rng, edge if edge.any() else region)
    else:
        cx, cy = _pick_center(h, w, rng, None)
    r = rng.uniform(0.06, 0.14) * s
    alpha = _blob(h, w, cx, cy, r, r * rng.uniform(0.6, 1.0), rng, rough=0.25)
    if region is not None:
        alpha = alpha * region  # only object pixels can go missing
    bg = _background_colour(img, region)
    paint = bg[None, None, :] + rng.standard_normal(img.shape, dtype=np.float32) * 4
    return _composite(img, alpha, paint), alpha


def foreign_object(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """Something that does not belong: a fibre, a chip or a droplet lying on the surface."""
    h, w = img.shape[:2]
    s = min(h, w)
    cx, cy = _pick_center(h, w, rng, region)
    mean = img.reshape(-1, 3).mean(0)
    colour = np.where(mean > 128, rng.uniform(10, 70, 3), rng.uniform(180, 250, 3)).astype(np.float32)
    if rng.random() < 0.5:  # fibre / hair
        pts = _polyline(cx, cy, rng.uniform(0.15, 0.35) * s, rng, wiggle=0.25, step=max(2.0, s / 64))
        alpha = _stroke_alpha(h, w, [pts], [max(1, int(s / 110))], blur=0.4)
    else:  # chip / particle
        r = rng.uniform(0.025, 0.07) * s + 1.5
        alpha = _soften(_blob(h, w, cx, cy, r, r * rng.uniform(0.5, 1.0), rng, rough=0.3), 0.6)
    shade = 0.85 + 0.3 * smooth_noise(h, w, rng, cells=6, octaves=1)[..., None]
    paint = np.clip(colour[None, None, :] * shade, 0, 255)
    return _composite(img, alpha, paint), alpha


def cut_paste(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """CutPaste: a patch of the same image, jittered in colour and rotated, pasted elsewhere."""
    h, w = img.shape[:2]
    s = min(h, w)
    pw, ph = int(rng.uniform(0.08, 0.2) * s) + 2, int(rng.uniform(0.06, 0.18) * s) + 2
    sx, sy = int(rng.integers(0, max(1, w - pw))), int(rng.integers(0, max(1, h - ph)))
    patch = img[sy : sy + ph, sx : sx + pw]
    patch = np.clip(
        patch * rng.uniform(0.85, 1.15, 3)[None, None, :] * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25),
        0,
        255,
    )
    angle = float(rng.uniform(-60, 60))
    pim = Image.fromarray(patch.astype(np.uint8)).rotate(angle, expand=True, resample=Image.BILINEAR)
    pmask = Image.new("L", (pw, ph), 255).rotate(angle, expand=True, resample=Image.BILINEAR)
    cx, cy = _pick_center(h, w, rng, region)
    x0, y0 = cx - pim.width // 2, cy - pim.height // 2
    mcanvas = Image.new("L", (w, h), 0)
    layer = Image.new("RGB", (w, h))
    layer.paste(pim, (x0, y0))
    mcanvas.paste(pmask, (x0, y0))
    alpha = np.asarray(mcanvas, dtype=np.float32) / 255.0
    return _composite(img, alpha, np.asarray(layer, dtype=np.float32)), alpha


_TEXTURE_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def _texture_source(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    paths = skimage_texture_paths()
    if paths and rng.random() < 0.6:
        p = paths[int(rng.integers(len(paths)))]
        key = (str(p), h, w)
        if key not in _TEXTURE_CACHE:
            _TEXTURE_CACHE[key] = np.asarray(
                Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR), np.float32
            )
        return _TEXTURE_CACHE[key]
    n = smooth_noise(h, w, rng, cells=8, octaves=3)[..., None]
    colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (colour_a * n + colour_b * (1 - n)).astype(np.float32)


def perlin_blend(img: np.ndarray, rng: np.random.Generator, region: np.ndarray | None = None):
    """DRAEM: a thresholded Perlin-noise region blended (opacity beta) with a foreign texture."""
    h, w = img.shape[:2]
    for _ in range(6):
        noise = smooth_noise(h, w, rng, cells=int(rng.integers(2, 6)), octaves=3)
        alpha = (noise > rng.uniform(0.72, 0.82)).astype(np.float32)
        if region is not None:
            alpha *= region
        if alpha.sum() > 0.002 * h * w:
            break
    alpha = _soften(alpha, 0.8)
    beta = rng.uniform(0.15, 0.6)  # DRAEM's opacity: how much of the original shows through
    paint = beta * img + (1 - beta) * _texture_source(h, w, rng)
    return _composite(img, alpha, paint), alpha


SYNTHESISERS = {
    "cut_paste": cut_paste,
    "scratch": scratch,
    "crack": crack,
    "stain": stain,
    "hole": hole,
    "missing_part": missing_part,
    "foreign_object": foreign_object,
    "perlin_blend": perlin_blend,
}


def synthesize(
    image: np.ndarray | Image.Image,
    kind: str | None = None,
    rng: np.random.Generator | int | None = None,
    region: np.ndarray | None = None,
    kinds: tuple[str, ...] = DEFECT_KINDS,
    min_area: int = 6,
) -> Defect:
    """Put one defect of `kind` (random from `kinds` if None) on a normal image, inside `region` if given.

    Retries a few placements so the mask is never empty; the mask is alpha > 0.5 and boxes come from it.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    img = arr[..., :3].astype(np.float32)
    kind = kind or kinds[int(rng.integers(len(kinds)))]
    fn = SYNTHESISERS[kind]
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != img.shape[:2] or not region.any():
            region = None
    for _ in range(8):
        out, alpha = fn(img, rng, region)
        mask = alpha > 0.5
        if mask.sum() >= min_area:
            break
    # soft edges may leave faint alpha far from the mask (isolated noise specks): keep the image exactly
    # unchanged there, so every altered pixel lies in or right next to the mask
    near = grow_mask(mask, 3)
    out = np.where(near[..., None], out, img)
    out_u8 = np.clip(out, 0, 255).astype(np.uint8)
    boxes = [b.as_list() for b in boxes_from_map(mask, min_area=max(4, min_area // 2), merge_gap=4)]
    return Defect(out_u8, mask, DEFECT_TYPE_NAMES[kind], kind, boxes)


def foreground(image: np.ndarray | Image.Image) -> np.ndarray | None:
    """A rough object mask (Otsu on the distance to the border colour); None for full-frame textures."""
    from skimage.filters import threshold_otsu

    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    bg = _background_colour(arr, None)
    dist = np.abs(arr - bg).sum(-1)
    if float(dist.max()) < 20:
        return None
    fg = dist > threshold_otsu(dist)
    frac = fg.mean()
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]]).mean()
    # an object sits inside the frame; a pattern that runs off every edge (a PCB, a texture) is not one
    return fg if 0.05 < frac < 0.9 and border < 0.05 else None
