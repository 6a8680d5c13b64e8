"""SynthInspect: procedural industrial-looking images with known defects (type, pixel mask, box) or none.

Nine categories — textures (woven, brushed_metal, wood, grid) and objects seen from above (nut, pill,
bottle, screw, pcb) — each rendered with numpy + PIL in a few milliseconds, then given one defect from
`defects.py` that fits the category (a PCB gets opens, shorts and pin-holes; a pill gets chips and stains),
placed on the object's own pixels. Sample `i` of seed `s` depends only on (s, i): generation is
deterministic, order-free and parallelisable. Output: an MVTec-layout folder (readable by
`sources.read_mvtec`) or a `datasets.Dataset`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomaly_assistant.data_builders.defects import smooth_noise, synthesize, yx_grid
from anomaly_assistant.data_builders.records import Record

TEXTURES = ("woven", "brushed_metal", "wood", "grid")
OBJECTS = ("nut", "pill", "bottle", "screw", "pcb")
CATEGORIES = TEXTURES + OBJECTS

# which synthesisers make sense per category, and what an inspector of that part would call the result
CATEGORY_DEFECTS: dict[str, dict[str, str]] = {
    "woven": {
        "cut_paste": "misweave",
        "stain": "stain",
        "hole": "hole",
        "foreign_object": "thread",
        "perlin_blend": "colour_variation",
    },
    "brushed_metal": {
        "scratch": "scratch",
        "stain": "stain",
        "hole": "pit",
        "perlin_blend": "corrosion",
        "foreign_object": "contamination",
    },
    "wood": {
        "crack": "crack",
        "hole": "hole",
        "stain": "stain",
        "scratch": "scratch",
        "perlin_blend": "discolouration",
    },
    "grid": {
        "missing_part": "broken_wire",
        "foreign_object": "contamination",
        "cut_paste": "bent_wire",
        "crack": "crack",
    },
    "nut": {
        "scratch": "scratch",
        "missing_part": "broken_edge",
        "stain": "stain",
        "crack": "crack",
        "foreign_object": "contamination",
    },
    "pill": {
        "crack": "crack",
        "missing_part": "chip",
        "stain": "stain",
        "foreign_object": "contamination",
        "hole": "pit",
    },
    "bottle": {
        "crack": "crack",
        "missing_part": "broken_rim",
        "stain": "contamination",
        "foreign_object": "foreign_object",
        "scratch": "scratch",
    },
    "screw": {
        "scratch": "scratch",
        "missing_part": "damaged_thread",
        "stain": "stain",
        "foreign_object": "contamination",
    },
    "pcb": {
        "missing_part": "open",
        "foreign_object": "short",
        "hole": "pin-hole",
        "stain": "contamination",
        "cut_paste": "spur",
    },
}


@dataclass
class SynthConfig:
    """What SynthInspect generates."""

    size: int = 256
    categories: tuple[str, ...] = CATEGORIES
    anomaly_ratio: float = 0.5  # fraction of samples that carry a defect
    seed: int = 0


@dataclass
class SynthSample:
    """One generated image (uint8 HxWx3) with its ground truth; `mask` is None for normal samples."""

    image: np.ndarray
    gt_label: int
    category: str
    defect_type: str | None = None
    mask: np.ndarray | None = None
    gt_boxes: list[list[float]] = field(default_factory=list)
    index: int = 0
    kind: str | None = None  # the synthesiser that made the defect


# --------------------------------------------------------------------------------------------- renderers
# Each renderer: (size, rng) -> (float32 image [H, W, 3] in 0..255, foreground mask or None,
# defect region or None)


_GRAIN_BANK: dict[tuple[int, int], np.ndarray] = {}


def _grain(h: int, w: int, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Sensor-like grain, [H, W, 1]: a randomly shifted window of a fixed unit-noise field.

    Drawing fresh noise per image costs more than the rest of a render.
    """
    bank = _GRAIN_BANK.get((h, w))
    if bank is None:
        bank = _GRAIN_BANK[(h, w)] = np.random.default_rng(12345).standard_normal(
            (2 * h, 2 * w, 1), dtype=np.float32
        )
    y, x = int(rng.integers(h)), int(rng.integers(w))
    return bank[y : y + h, x : x + w] * np.float32(amount)


def _woven(s: int, rng: np.random.Generator):
    period = int(rng.integers(8, 16))
    yy, xx = yx_grid(s, s)
    phase_x = (xx % period) / period * math.pi
    phase_y = (yy % period) / period * math.pi
    over = ((xx // period + yy // period) % 2).astype(np.float32)
    profile = over * np.sin(phase_y) + (1 - over) * np.sin(phase_x)  # [H, W] thread shading
    base = rng.uniform(60, 200, 3).astype(np.float32)
    img = base[None, None, :] * (0.55 + 0.45 * profile[..., None]) + _grain(s, s, rng, 4)
    return img, None, None


def _brushed_metal(s: int, rng: np.random.Generator):
    streak = rng.random((s, max(2, s // 24)), dtype=np.float32)
    streak = np.asarray(Image.fromarray(streak, mode="F").resize((s, s), Image.BILINEAR))
    light = np.linspace(rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.2), s, dtype=np.float32)[None, :]
    grey = (140 + 40 * (streak - 0.5)) * light  # [H, W]
    tint = np.array([1.0, 1.0, rng.uniform(1.0, 1.08)], np.float32)
    img = grey[..., None] * tint[None, None, :] + _grain(s, s, rng, 3)
    return img, None, None


def _wood(s: int, rng: np.random.Generator):
    yy, xx = yx_grid(s, s)
    warp = smooth_noise(s, s, rng, cells=3, octaves=2) * rng.uniform(15, 35)
    cx = rng.uniform(-s, 2 * s)
    rings = np.sin((np.abs(xx - cx) * 0.6 + warp + 0.08 * yy) * rng.uniform(0.25, 0.45))
    fibres = smooth_noise(s, s, rng, cells=16, octaves=1)
    tone = 0.6 + 0.25 * rings + 0.15 * fibres  # [H, W]
    base = np.array([rng.uniform(150, 200), rng.uniform(95, 130), rng.uniform(50, 75)], np.float32)
    return base[None, None, :] * tone[..., None] + _grain(s, s, rng, 3), None, None


def _grid(s: int, rng: np.random.Generator):
    period = int(rng.integers(14, 26))
    width = max(2, period // 5)
    yy, xx = np.mgrid[0:s, 0:s]
    wire = (((xx % period) < width) | ((yy % period) < width)).astype(np.float32)
    img = np.where(wire[..., None] > 0, np.float32(rng.uniform(160, 210)), np.float32(rng.uniform(20, 50)))
    img = np.repeat(img, 3, axis=-1) + _grain(s, s, rng, 4)
    return img, None, wire > 0


def _background(s: int, rng: np.random.Generator):
    level = rng.uniform(15, 60) if rng.random() < 0.6 else rng.uniform(190, 235)
    vignette = smooth_noise(s, s, rng, cells=2, octaves=1)[..., None] * 12
    return np.full((s, s, 3), level, np.float32) + vignette + _grain(s, s, rng, 2)


def _shade(
    img: np.ndarray, mask: np.ndarray, colour: np.ndarray, cx: float, cy: float, r: float, s: int
) -> np.ndarray:
    """Paint `colour` inside mask with a radial light falloff (metal/plastic look)."""
    yy, xx = yx_grid(s, s)
    d = np.sqrt((xx - cx + 0.3 * r) ** 2 + (yy - cy + 0.3 * r) ** 2) / max(r, 1.0)
    light = np.clip(1.25 - 0.5 * d, 0.5, 1.25)[..., None]  # [H, W, 1]
    return np.where(mask[..., None], np.clip(colour[None, None, :] * light, 0, 255), img)


def _nut(s: int, rng: np.random.Generator):
    img = _background(s, rng)
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05) * s, s / 2 + rng.uniform(-0.05, 0.05) * s
    r = rng.uniform(0.28, 0.38) * s
    rot = rng.uniform(0, math.pi / 3)
    hexagon = [
        (cx + r * math.cos(rot + k * math.pi / 3), cy + r * math.sin(rot + k * math.pi / 3)) for k in range(6)
    ]
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(hexagon, fill=255)
    hr = r * rng.uniform(0.4, 0.5)
    draw.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=0)
    fg = np.asarray(canvas) > 127
    img = _shade(img, fg, np.array([170, 170, 160], np.float32) * rng.uniform(0.8, 1.1), cx, cy, r, s)
    # thread ring inside the hole
    ring = Image.new("L", (s, s), 0)
    ImageDraw.Draw(ring).ellipse([cx - hr - 3, cy - hr - 3, cx + hr + 3, cy + hr + 3], outline=255, width=3)
    img = np.where((np.asarray(ring) > 0)[..., None] & fg[..., None], img * 0.7, img)
    return img, fg, fg


def _pill(s: int, rng: np.random.Generator):
    img = _background(s, rng)
    cx, cy = s / 2, s / 2
    rx, ry = rng.uniform(0.3, 0.4) * s, rng.uniform(0.15, 0.22) * s
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    draw.rounded_rectangle([cx - rx, cy - ry, cx + rx, cy + ry], radius=int(ry), fill=255)
    fg = np.asarray(canvas) > 127
    palette = [(235, 230, 220), (220, 120, 90), (240, 210, 120), (200, 220, 240)]
    colour = np.array(palette[int(rng.integers(len(palette)))], np.float32)
    img = _shade(img, fg, colour, cx, cy, rx, s)
    speckle = (rng.random((s, s)) < 0.01) & fg  # MVTec's pills carry red speckles: normal variation
    img[speckle] = img[speckle] * 0.8
    score = Image.new("L", (s, s), 0)
    ImageDraw.Draw(score).line([(cx, cy - ry * 0.8), (cx, cy + ry * 0.8)], fill=255, width=2)
    img = np.where((np.asarray(score) > 0)[..., None] & fg[..., None], img * 0.8, img)
    return img, fg, fg


def _bottle(s: int, rng: np.random.Generator):
    img = _background(s, rng)
    cx, cy = s / 2, s / 2
    r = rng.uniform(0.35, 0.45) * s
    yy, xx = yx_grid(s, s)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r  # [H, W] radius in units of r
    fg = d <= 1.0
    glass = np.array([rng.uniform(70, 110), rng.uniform(45, 70), rng.uniform(20, 40)], np.float32)
    rim = np.clip(1.0 - np.abs(d - 0.85) * 8, 0, 1)[..., None]
    inner = np.clip(1.0 - d / 0.55, 0, 1)[..., None]
    body = glass[None, None, :] * (0.6 + 0.9 * rim) * (1 - 0.5 * inner)
    img = np.where(fg[..., None], body, img)
    return img, fg, fg


def _screw(s: int, rng: np.random.Generator):
    img = _background(s, rng)
    angle = rng.uniform(0, math.pi)
    length, half_w = rng.uniform(0.5, 0.65) * s, rng.uniform(0.05, 0.07) * s
    cx, cy = s / 2, s / 2
    ux, uy = math.cos(angle), math.sin(angle)
    px, py = -uy, ux
    a = (cx - ux * length / 2, cy - uy * length / 2)
    b = (cx + ux * length / 2, cy + uy * length / 2)
    shaft = [
        (a[0] + px * half_w, a[1] + py * half_w),
        (b[0] + px * half_w * 0.5, b[1] + py * half_w * 0.5),
        (b[0] - px * half_w * 0.5, b[1] - py * half_w * 0.5),
        (a[0] - px * half_w, a[1] - py * half_w),
    ]
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(shaft, fill=255)
    hr = half_w * 2.0
    draw.ellipse([a[0] - hr, a[1] - hr, a[0] + hr, a[1] + hr], fill=255)
    fg = np.asarray(canvas) > 127
    img = _shade(img, fg, np.array([165, 165, 170], np.float32), cx, cy, length / 2, s)
    threads = Image.new("L", (s, s), 0)
    tdraw = ImageDraw.Draw(threads)
    pitch = max(3.0, half_w * 0.7)
    t = hr
    while t < length:
        x, y = a[0] + ux * t, a[1] + uy * t
        tdraw.line(
            [(x + px * half_w, y + py * half_w), (x - px * half_w + ux * 2, y - py * half_w + uy * 2)],
            fill=255,
        )
        t += pitch
    img = np.where((np.asarray(threads) > 0)[..., None] & fg[..., None], img * 0.6, img)
    return img, fg, fg


def _pcb(s: int, rng: np.random.Generator):
    board = np.array([rng.uniform(20, 50), rng.uniform(90, 130), rng.uniform(40, 70)], np.float32)
    img = np.ones((s, s, 3), np.float32) * board[None, None, :] + _grain(s, s, rng, 3)
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    step = s // 8
    for _ in range(int(rng.integers(6, 11))):  # Manhattan traces between pads
        x, y = int(rng.integers(1, 8)) * step, int(rng.integers(1, 8)) * step
        pts = [(x, y)]
        for _ in range(int(rng.integers(2, 4))):
            if rng.random() < 0.5:
                x = int(rng.integers(1, 8)) * step
            else:
                y = int(rng.integers(1, 8)) * step
            pts.append((x, y))
        draw.line(pts, fill=255, width=max(2, s // 64))
        for px, py in (pts[0], pts[-1]):
            pr = max(3, s // 40)
            draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)
    copper = np.asarray(canvas) > 127
    img = np.where(
        copper[..., None], np.array([200, 160, 90], np.float32)[None, None, :] + _grain(s, s, rng, 6), img
    )
    return img, None, copper


RENDERERS = {
    "woven": _woven,
    "brushed_metal": _brushed_metal,
    "wood": _wood,
    "grid": _grid,
    "nut": _nut,
    "pill": _pill,
    "bottle": _bottle,
    "screw": _screw,
    "pcb": _pcb,
}


# --------------------------------------------------------------------------------------------- generator


def render(
    category: str,
    index: int,
    seed: int = 0,
    size: int = 256,
    anomalous: bool | None = None,
    anomaly_ratio: float = 0.5,
) -> SynthSample:
    """Sample `index` of `category` for `seed`: identical for identical arguments."""
    if category not in RENDERERS:
        raise ValueError(f"unknown SynthInspect category {category!r}; choose from {', '.join(CATEGORIES)}")
    rng = np.random.default_rng([seed, CATEGORIES.index(category), index])
    if anomalous is None:
        anomalous = bool(rng.random() < anomaly_ratio)
    img, fg, region = RENDERERS[category](size, rng)
    img_u8 = np.clip(img, 0, 255).astype(np.uint8)
    if not anomalous:
        return SynthSample(img_u8, 0, category, index=index)
    options = CATEGORY_DEFECTS[category]
    kind = list(options)[int(rng.integers(len(options)))]
    # PCB opens and pin-holes sit in copper, shorts and spurs between traces; elsewhere defects sit on the
    # part
    if category == "pcb":
        place = region if kind in ("missing_part", "hole") else None
    else:
        place = region if region is not None else fg
    d = synthesize(img_u8, kind, rng, region=place)
    boxes = d.boxes
    return SynthSample(d.image, 1, category, options[kind], d.mask, boxes, index, kind)


class SynthInspect:
    """Deterministic stream of samples cycling through the configured categories."""

    def __init__(self, config: SynthConfig | None = None, **overrides) -> None:
        self.config = config or SynthConfig(**overrides)
        for c in self.config.categories:
            if c not in RENDERERS:
                raise ValueError(f"unknown SynthInspect category {c!r}")

    def sample(self, i: int, anomalous: bool | None = None) -> SynthSample:
        cats = self.config.categories
        return render(
            cats[i % len(cats)],
            i // len(cats),
            self.config.seed,
            self.config.size,
            anomalous,
            self.config.anomaly_ratio,
        )

    def generate(self, n: int, start: int = 0) -> Iterator[SynthSample]:
        for i in range(start, start + n):
            yield self.sample(i)

    def write_mvtec(
        self, out_dir: str | Path, n_train: int, n_test: int, progress: bool = False, total: int | None = None
    ) -> list[Record]:
        """Write `<out>/<category>/{train/good,test/<defect>,ground_truth/<defect>}` (MVTec AD layout).

        `n_train` normal and `n_test` mixed images per category, or, with `total`, `total` mixed test images
        spread over the categories as evenly as possible; returns the written records.
        """
        from tqdm.auto import tqdm

        out = Path(out_dir)
        records: list[Record] = []
        cfg = self.config
        n_cats = len(cfg.categories)
        tests = (
            [n_test] * n_cats
            if total is None
            else [total // n_cats + (k < total % n_cats) for k in range(n_cats)]
        )
        bar = tqdm(total=n_cats * n_train + sum(tests), desc="SynthInspect", disable=not progress, unit="img")
        for cat, n_test in zip(cfg.categories, tests):
            for i in range(n_train):
                smp = render(cat, i, cfg.seed, cfg.size, anomalous=False)
                path = out / cat / "train" / "good" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(smp.image).save(path, compress_level=1)
                records.append(
                    Record(
                        str(path),
                        0,
                        category=cat,
                        source="synth_inspect",
                        split="train",
                        image_size=(cfg.size, cfg.size),
                    )
                )
                bar.update()
            counters: dict[str, int] = {}
            for j in range(n_test):
                smp = render(cat, n_train + j, cfg.seed, cfg.size, anomaly_ratio=cfg.anomaly_ratio)
                folder = smp.defect_type or "good"
                k = counters.get(folder, 0)
                counters[folder] = k + 1
                path = out / cat / "test" / folder / f"{k:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(smp.image).save(path, compress_level=1)
                mask_path = None
                if smp.mask is not None:
                    mpath = out / cat / "ground_truth" / folder / f"{k:03d}_mask.png"
                    mpath.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(smp.mask.astype(np.uint8) * 255).save(mpath, compress_level=1)
                    mask_path = str(mpath)
                records.append(
                    Record(
                        str(path),
                        smp.gt_label,
                        mask_path,
                        smp.gt_boxes,
                        smp.defect_type,
                        cat,
                        "synth_inspect",
                        "test",
                        image_size=(cfg.size, cfg.size),
                    )
                )
                bar.update()
        bar.close()
        return records

    def to_dataset(self, n: int, start: int = 0):
        """A `datasets.Dataset` of `n` samples from `start`.

        Columns: image, mask (None for normal), gt_label, gt_boxes, defect_type, category.
        """
        import datasets

        def gen():
            for smp in self.generate(n, start):
                yield {
                    "image": Image.fromarray(smp.image),
                    "mask": Image.fromarray(smp.mask.astype(np.uint8) * 255)
                    if smp.mask is not None
                    else None,
                    "gt_label": smp.gt_label,
                    "gt_boxes": smp.gt_boxes,
                    "defect_type": smp.defect_type,
                    "category": smp.category,
                    "source": "synth_inspect",
                }

        features = datasets.Features(
            {
                "image": datasets.Image(),
                "mask": datasets.Image(),
                "gt_label": datasets.Value("int64"),
                "gt_boxes": datasets.List(datasets.List(datasets.Value("float32"))),
                "defect_type": datasets.Value("string"),
                "category": datasets.Value("string"),
                "source": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_generator(gen, features=features)
