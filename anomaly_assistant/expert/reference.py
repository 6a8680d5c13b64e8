"""Training-free few-shot screening: a memory bank of reference-normal patch features (PatchCore style).

Given k known-good images of a part, every patch of a query image is scored by its distance to the nearest
reference patch. Pieces, each usable alone:

- `embed_levels`: locally aware patch features (k×k average over each level, PatchCore's aggregation), all
  levels aligned to the finest level's grid and concatenated -> one (H, W, D) grid per image.
- `greedy_coreset`: k-center greedy subsampling (on a random projection) for large banks; keeps coverage.
- `MemoryBank`: nearest-neighbour distance maps, plus the references' own leave-one-out distances, which
  calibrate scores so that they are comparable across parts.
- `ReferenceScreener`: fit(references) / predict(images) -> `ScreenResult(score, anomaly_map, label)`, the map
  at the ORIGINAL image resolution.

Calibration (the documented decision threshold). Let tau be the largest image score any reference gets against
the bank built from the OTHER references (leave-one-out; with a single reference, its patches against the same
image's patches outside a spatial neighbourhood). A raw distance d becomes z = d / tau and then
`z² / (1 + z²)` in [0, 1]. So 0.5 means "as unusual as the least typical known-good reference looks to the
others", the default decision threshold (`localize.DEFAULT_THRESHOLD`; `label = score >= threshold`, the
threshold given per `predict` call). The same mapping is applied per pixel, so map values are comparable with
the score. A good part and the k references are alike, so about 1 good part in k + 1 scores above the least
typical reference: with 2 / 4 / 8 / 16 references 31 % / 18 % / 7 % / 8 % of good SynthInspect parts were
flagged.

Screening options that matter on real parts (see research/screening_study.py for their measured effect):
- `scale="reference"` resizes every image by ONE factor derived from the references (keeps aspect ratio and
  the physical texture scale; squashing differently shaped images to a square changes texture frequency).
- `illumination="flatfield"` divides the image by a heavily blurred copy of itself (removes slow lighting
  gradients and tile-to-tile brightness changes before features are computed).
- the source's `pad` (reflect padding) stops the network's zero padding from making border cells look
  anomalous.
- `zoom`: a second, magnified look at the most suspicious regions, matched against references at the same
  magnification, so defects a few pixels wide at the first look's resolution are resolved.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from anomaly_assistant.expert.sources import FeatureSource, LevelGrids
from anomaly_assistant.localize import DEFAULT_THRESHOLD, is_anomalous

from ..images import FLIPS


# ------------------------------------------------------------------------------------------------------------
# Patch embedding and coreset
# ------------------------------------------------------------------------------------------------------------
def embed_levels(levels: LevelGrids, patch_size: int = 3, instance_norm: bool = False) -> torch.Tensor:
    """Level grids (H_l, W_l, C_l) -> one (H, W, D) grid on the finest level's grid.

    Each level is averaged over a patch_size² neighbourhood (border cells average only over valid cells),
    resized bilinearly to the finest grid and concatenated along channels. `instance_norm` subtracts each
    channel's mean over the image and divides by its std, removing global appearance shifts (exposure, gain)
    shared by all patches.
    """
    target = max((g.shape[0] * g.shape[1], tuple(g.shape[:2])) for g in levels)[1]
    out = []
    for g in levels:
        x = g.permute(2, 0, 1)[None].float().contiguous()  # [1, C, H, W]
        if instance_norm:
            std, mean = torch.std_mean(x, (2, 3), keepdim=True)
            x = (x - mean) / (std + 1e-5)
        if patch_size > 1:
            x = box_mean(x, patch_size)
        if tuple(x.shape[2:]) != target:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        out.append(x)
    return torch.cat(out, 1)[0].permute(1, 2, 0).contiguous()  # [H, W, D]


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> mean over each k×k window, border windows averaging only their valid cells.

    Equal to avg_pool2d(count_include_pad=False), as a depthwise convolution: 2x faster on CPU for these
    grids.
    """
    C, (H, W) = x.shape[1], x.shape[2:]
    ones = torch.ones(C, 1, k, k, dtype=x.dtype)
    total = F.conv2d(x, ones, padding=k // 2, groups=C)
    count = F.conv2d(torch.ones(1, 1, H, W, dtype=x.dtype), ones[:1], padding=k // 2)
    return total / count


def greedy_coreset(features: torch.Tensor, n: int, proj_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of n rows chosen by k-center greedy (each pick is the row farthest from all picks so far).

    Distances are taken on a fixed random projection (Johnson-Lindenstrauss) for speed; deterministic for a
    seed. Each pick costs one matrix-vector product (squared distances from the norms): 11x faster than a
    cdist per pick: the coreset of 4 references with mirrored views (12 288 patches to 2048) takes about
    0.5 s, not 4-6 s.
    """
    N, D = features.shape
    if n >= N:
        return torch.arange(N)
    x = features.float()
    if D > proj_dim:
        g = torch.Generator().manual_seed(seed)
        x = x @ (torch.randn(D, proj_dim, generator=g) / math.sqrt(proj_dim))  # [N, proj_dim]
    x = x.contiguous()
    sq = (x * x).sum(1)  # [N]; squared distances |x|² + |x_j|² - 2 x·x_j rank like distances
    picks = torch.empty(n, dtype=torch.long)
    picks[0] = 0
    mind = (sq - 2 * torch.mv(x, x[0]) + sq[0]).clamp_min(0)  # [N]
    for i in range(1, n):
        j = int(torch.argmax(mind))
        picks[i] = j
        torch.minimum(mind, (sq - 2 * torch.mv(x, x[j]) + sq[j]).clamp_min(0), out=mind)
    return picks


def nn_distance(query: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 256) -> torch.Tensor:
    """(N, D) queries vs (M, D) bank -> (N,) mean Euclidean distance to the k nearest bank rows.

    |q - b|² = |q|² + |b|² - 2 q·b with one fused addmm per chunk of queries; |q|² is added after the minimum
    (it does not change which bank row is nearest). Chunks of 256 keep the (256, M) block in cache: 3x faster
    than one (N, M) block at N = 1024, M = 2048 on CPU.
    """
    bank_sq = (bank * bank).sum(1)[None]  # [1, M]
    # [D, M] view: BLAS reads it transposed, as fast as a contiguous copy and without the copy
    bank_t = bank.T
    out = []
    for s in range(0, query.shape[0], chunk):
        q = query[s : s + chunk]
        d2 = torch.addmm(bank_sq, q, bank_t, alpha=-2.0)  # [n, M], |b|² - 2 q·b
        d2 = d2.topk(k, dim=1, largest=False).values if k > 1 else d2.amin(1, keepdim=True)  # [n, k]
        out.append((d2 + (q * q).sum(1, keepdim=True)).clamp_min(0).sqrt().mean(1))
    return torch.cat(out)


def reduce_score(dist_map: torch.Tensor, mode: str = "max", topk: float = 0.01) -> torch.Tensor:
    """(…, H, W) map -> image score: the max, or the mean of the top `topk` fraction of cells."""
    flat = dist_map.flatten(-2)
    if mode == "max":
        return flat.max(-1).values
    if mode == "topk":
        k = max(1, int(round(topk * flat.shape[-1])))
        return flat.topk(k, -1).values.mean(-1)
    raise ValueError(f"score mode must be 'max' or 'topk', got {mode!r}")


def gaussian_blur_map(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an (H, W) map (reflect borders); sigma in cells."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None, None]
    ph, pw = min(r, x.shape[0] - 1), min(r, x.shape[1] - 1)
    y = (F.pad(y, (pw, pw, ph, ph), mode="reflect") if ph > 0 and pw > 0
         else F.pad(y, (r, r, r, r), "replicate"))
    if ph < r or pw < r:  # tiny maps: top up with replicate padding
        y = F.pad(y, (r - pw, r - pw, r - ph, r - ph), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[0, 0]


# Unlikeness (`MemoryBank.distance_map_and_unlikeness`) from which a screened image is said not to look like
# its references. Measured with 4 references on SynthInspect (9 categories, 128 px): images of the references'
# own category 0.59-1.19 (normal and defective alike), another category's 1.19-2.0 (8 of 9 pairs >= 1.23); a
# magnetic tile against a DeepPCB template 1.31-1.40.
UNLIKE_REFERENCES = 1.25


def reference_warning(unlikeness: float | None) -> str | None:
    """The note for a Finding whose references do not look like the image, or None."""
    if unlikeness is None or unlikeness < UNLIKE_REFERENCES:
        return None
    return (f"the references do not look like this image (its typical patch is {unlikeness:.1f}x as far from "
            "them as they are from each other): the verdict is unreliable; use good images of this same part")


def calibrate(z: torch.Tensor | float) -> torch.Tensor:
    """Distance relative to the references' own leave-one-out scale -> [0, 1]; z = 1 maps to 0.5."""
    z = torch.as_tensor(z, dtype=torch.float32).clamp_min(0)
    return z * z / (1.0 + z * z)


# ------------------------------------------------------------------------------------------------------------
# Memory bank
# ------------------------------------------------------------------------------------------------------------
def _check_settings(kind: str, settings: object, positive: Sequence[str] = (),
                    non_negative: Sequence[str] = (),
                    choices: dict[str, Sequence[str]] | None = None) -> None:
    """A ValueError naming the first setting whose value is out of range or not among its choices."""
    for name in (*positive, *non_negative):
        value = getattr(settings, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (value > 0 if name in positive else value >= 0):
            bound = "> 0" if name in positive else ">= 0"
            raise ValueError(f"{kind} setting {name} must be a number {bound}, got {value!r}")
    for name, allowed in (choices or {}).items():
        if getattr(settings, name) not in allowed:
            given = getattr(settings, name)
            raise ValueError(f"{kind} setting {name} must be one of {list(allowed)}, got {given!r}")


@dataclass
class BankConfig:
    """Memory-bank settings.

    patch_size: locally aware aggregation window (cells).
    knn: distances averaged over the k nearest bank patches.
    max_bank: greedy coreset above this many patches (0 = never). score/topk: image score reduction.
    blur_sigma: Gaussian smoothing of the cell map before scoring (cells).
    instance_norm: per-image channel standardisation of features (see `embed_levels`).
    self_radius: if > 0, the map is the geometric mean of the reference distance and the image's distance to
        itself outside a (2r+1)² cell window (`self_distance`): normal-but-unseen surfaces repeat within the
        image.
    position_norm: if > 0 (and k >= 2), divide maps by the references' mean leave-one-out map at the same
        RELATIVE position (pooled to a position_norm² grid): places where normal parts already vary among
        themselves (image borders, part edges) are discounted by how much they vary, learnt from the
        references alone.
    relative: divide each map by its own median (never by less than the references' typical median), so a
        query that is globally unlike the references (another variant of the part, lighting) is not flagged
        for that alone; only local departures stand out.
    held_out_profile: calibrate each reference with the position profile of the OTHER references (a profile
        that contains the map it divides flattens that map's own peaks and sets tau too low: with 2 / 4
        references 75 % / 44 % of good SynthInspect parts were flagged, 31 % / 18 % held out). False keeps
        the in-sample profile of checkpoints whose score fusion was chosen with it (the default model).
    """

    patch_size: int = 3
    knn: int = 1
    max_bank: int = 2048
    score: str = "max"
    topk: float = 0.01
    blur_sigma: float = 1.0
    instance_norm: bool = True
    self_radius: int = 0
    relative: bool = True
    position_norm: int = 16
    held_out_profile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a bad value when the settings are made (config.json, a CLI flag), not at the first image."""
        _check_settings("bank", self, positive=("patch_size", "knn"),
                        non_negative=("max_bank", "blur_sigma", "self_radius", "position_norm"),
                        choices={"score": ("max", "topk")})
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"bank setting topk must lie in (0, 1], got {self.topk!r}")


class MemoryBank:
    """Patch features of reference normals; nearest-neighbour distance maps and leave-one-out calibration."""

    def __init__(self, config: BankConfig | None = None):
        self.config = config or BankConfig()
        self.features: torch.Tensor | None = None  # [M, D]
        self.origin: torch.Tensor | None = None  # [M] reference index of each bank row
        self.tau: float = 1.0
        self.ref_scores: list[float] = []
        self.profile: torch.Tensor | None = None  # [P, P] position profile (`BankConfig.position_norm`)
        self.ref_median: float | None = None  # the references' typical median distance

    def embed(self, levels: LevelGrids) -> torch.Tensor:
        return embed_levels(levels, self.config.patch_size, self.config.instance_norm)  # [H, W, D]

    def fit(self, reference_levels: Sequence[LevelGrids], groups: Sequence[int] | None = None) -> MemoryBank:
        """Build the bank from per-reference level grids and compute the leave-one-out scale tau.

        groups: the original reference each entry comes from (augmented copies share it), so leave-one-out
        leaves out a reference together with its copies.
        """
        if not reference_levels:
            raise ValueError("need at least one reference")
        groups = list(range(len(reference_levels))) if groups is None else list(groups)
        embs = [self.embed(lv) for lv in reference_levels]
        feats = torch.cat([e.reshape(-1, e.shape[-1]) for e in embs])  # [N, D]
        origin = torch.cat([torch.full((e.shape[0] * e.shape[1],), g) for g, e in zip(groups, embs)])
        c = self.config
        if c.max_bank and feats.shape[0] > c.max_bank:
            keep = greedy_coreset(feats, c.max_bank, seed=c.seed)
            feats, origin = feats[keep], origin[keep]
        self.features, self.origin = feats.contiguous(), origin
        # score each original once, not its copies
        first = {g: i for i, g in reversed(list(enumerate(groups)))}
        self.profile = None
        loo = [self._map(embs[i], self.features[self.origin != g] if len(first) > 1 else None, final=False)
               for g, i in sorted(first.items())]
        held_out: list[torch.Tensor | None] = [None] * len(loo)  # None: the bank's own profile
        if c.position_norm and len(loo) > 1:
            P = c.position_norm
            pooled = torch.stack([F.adaptive_avg_pool2d(m[None, None], P)[0, 0] for m in loo])  # [k, P, P]
            self.profile = self._floored(pooled.mean(0))
            if c.held_out_profile:
                held_out = [self._floored(torch.cat([pooled[:j], pooled[j + 1:]]).mean(0))
                            for j in range(len(loo))]
        self.ref_median = float(np.mean([float(self._profiled(m).median()) for m in loo]))
        finished = [self._finish(m, p) for m, p in zip(loo, held_out)]
        self.ref_scores = [self.score(m) for m in finished]
        self.tau = max(max(self.ref_scores), 1e-6)
        return self

    @staticmethod
    def _floored(profile: torch.Tensor) -> torch.Tensor:
        """A position profile never divides by less than a tenth of its mean."""
        return profile.clamp_min(0.1 * float(profile.mean()) + 1e-6)

    def _map(self, e: torch.Tensor, bank: torch.Tensor | None, final: bool = True) -> torch.Tensor:
        """(H, W, D) embedding -> (H, W) map: nearest-neighbour distance to `bank`.

        With `bank` None only the image itself is matched, outside a neighbourhood. The distance is optionally
        combined with self-similarity, smoothed, and (when `final`) optionally made relative to its median.
        """
        c = self.config
        H, W, D = e.shape
        flat = e.reshape(-1, D)
        if bank is None:
            d = self_distance(e, max(2, c.self_radius, min(H, W) // 8))
        else:
            d = nn_distance(flat, bank, c.knn).view(H, W)
            if c.self_radius:
                # high only if unlike refs AND unlike itself
                d = torch.sqrt(d * self_distance(e, c.self_radius))
        d = gaussian_blur_map(d, c.blur_sigma)
        return self._finish(d) if final else d

    def _finish(self, d: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        """Position profile (the bank's unless given) and median normalisation of a smoothed (H, W) map."""
        d = self._profiled(d, profile)
        if self.config.relative and self.ref_median is not None:
            d = d / max(float(d.median()), self.ref_median, 1e-6)  # discount only globally unusual queries
        return d

    def _profiled(self, d: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        profile = self.profile if profile is None else profile
        if profile is not None:
            prof = F.interpolate(profile[None, None], size=d.shape, mode="bilinear", align_corners=False)
            d = d / prof[0, 0]
        return d

    def distance_map(self, levels: LevelGrids) -> torch.Tensor:
        """Level grids of one image -> (H, W) smoothed nearest-neighbour distance map on the finest grid."""
        return self.distance_map_and_unlikeness(levels)[0]

    def distance_map_and_unlikeness(self, levels: LevelGrids) -> tuple[torch.Tensor, float | None]:
        """`distance_map` and how unlike the references the image is as a whole.

        Unlikeness: the median cell's distance ÷ the references' own median leave-one-out distance (None
        without one). A defect moves a few cells, not the median, so about 1 means "looks like the
        references" and `UNLIKE_REFERENCES` or more means they show something else (`reference_warning`).
        """
        if self.features is None:
            raise RuntimeError("MemoryBank.fit must be called first")
        raw = self._map(self.embed(levels), self.features, final=False)
        ref_median = self.ref_median
        unlike = float(self._profiled(raw).median()) / max(ref_median, 1e-12) if ref_median else None
        return self._finish(raw), unlike

    def score(self, dist_map: torch.Tensor) -> float:
        return float(reduce_score(dist_map, self.config.score, self.config.topk))


def self_distance(e: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W, D) -> (H, W) distance of each cell to its nearest SAME-image cell outside a (2r+1)² window.

    Normal surfaces repeat themselves, defects rarely do: a zero-shot cue that needs no reference.
    """
    H, W, D = e.shape
    flat = e.reshape(-1, D)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    # [HW, HW]: pairs of cells within `radius` of each other
    near = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    d = torch.cdist(flat, flat).masked_fill(near, float("inf")).min(1).values.view(H, W)
    return torch.where(torch.isfinite(d), d, torch.zeros_like(d))


# ------------------------------------------------------------------------------------------------------------
# Image-level helpers
# ------------------------------------------------------------------------------------------------------------
ILLUMINATIONS = ("none", "flatfield", "standardize")  # the modes of `normalize_illumination`


def normalize_illumination(image: Image.Image, mode: str = "none", sigma_frac: float = 0.1) -> Image.Image:
    """Remove lighting differences before features are computed.

    "flatfield": divide by a Gaussian blur (sigma = sigma_frac × shorter side) and rescale to mid-grey, which
    removes slow gradients and global brightness; "standardize": per-channel zero mean / unit std then
    rescale; "none".
    """
    if mode == "none":
        return image
    base = image if image.mode == "L" else image.convert("RGB")  # grey stays one channel: a third of the work
    x = np.asarray(base, dtype=np.float32)  # [H, W] or [H, W, 3]
    if mode == "flatfield":
        sigma = max(1.0, sigma_frac * min(image.size))
        blur = np.asarray(base.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
        y = x / (blur + 8.0)  # ~1 on the background level
        y = (y - y.mean()) / (y.std() + 1e-6)
    elif mode == "standardize":
        y = (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6)
    else:
        raise ValueError(f"illumination must be one of {list(ILLUMINATIONS)}, got {mode!r}")
    y = np.clip(128.0 + 48.0 * y, 0, 255).astype(np.uint8)
    return Image.fromarray(y)


def upsample_map(m: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) map -> (H, W) bilinear (the grid covers the whole image, so corners align)."""
    return F.interpolate(m[None, None], size=size_hw, mode="bilinear", align_corners=False)[0, 0]


# ------------------------------------------------------------------------------------------------------------
# Timings: per call context, never on the (shared) screener
# ------------------------------------------------------------------------------------------------------------
_TIMINGS: ContextVar[dict[str, float] | None] = ContextVar("screening_timings", default=None)


@contextlib.contextmanager
def record_timings() -> Iterator[dict[str, float]]:
    """Seconds the screening calls inside the block spend extracting features and matching.

    Kept per thread / asyncio task, so concurrent screenings on one shared screener never add to each other's
    figures:

        with record_timings() as timings:
            screener.predict(images)
        timings["extract"], timings["match"]
    """
    timings = {"extract": 0.0, "match": 0.0}
    token = _TIMINGS.set(timings)
    try:
        yield timings
    finally:
        _TIMINGS.reset(token)


@contextlib.contextmanager
def _timed(kind: str) -> Iterator[None]:
    """Add the block's wall time to `kind` of the enclosing `record_timings` (if any)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if (timings := _TIMINGS.get()) is not None:
            timings[kind] += time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------------
# Screener
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ScreenerConfig:
    """Screening settings on top of a feature source and a bank.

    scale: "source" lets the source resize each image on its own (e.g. squash to a square); "reference"
        resizes all images by one factor, image_size / sqrt(median reference area), keeping aspect ratio and
        texture scale.
    image_size: the side the "reference" scale aims at (area ~ image_size² for a typical reference).
    illumination: see `normalize_illumination`.
    augment: extra reference views, "hflip" / "vflip" (only for parts whose normal appearance is
        mirror-symmetric; leave empty where a mirrored part would itself be a defect).
    zoom: magnification of the second look (0 or 1 disables). zoom_regions: how many top cells get a second
        look; zoom_window: side of each window as a fraction of the image's shorter side.
    The decision threshold is not a setting: it comes with each `predict` call.
    """

    scale: str = "reference"
    image_size: int = 256
    illumination: str = "flatfield"
    augment: tuple[str, ...] = ("hflip", "vflip")
    zoom: float = 0.0
    zoom_regions: int = 2
    zoom_window: float = 0.35
    bank: BankConfig = field(default_factory=BankConfig)

    def __post_init__(self) -> None:
        _check_settings("screener", self, positive=("image_size", "zoom_regions"), non_negative=("zoom",),
                        choices={"scale": ("source", "reference"),
                                 "illumination": ILLUMINATIONS})
        if isinstance(self.augment, str) or any(a not in FLIPS for a in self.augment):
            raise ValueError(f"screener setting augment must list views among {list(FLIPS)}, "
                             f"got {self.augment!r}")
        if not 0.0 < self.zoom_window <= 1.0:
            raise ValueError(f"screener setting zoom_window must lie in (0, 1], got {self.zoom_window!r}")

    @classmethod
    def from_dict(cls, data: dict) -> ScreenerConfig:
        """Inverse of `dataclasses.asdict`; a partial dict keeps the defaults of what it leaves out.

        Saved with fitted experts and carried by checkpoints (`reference_matching` in their config). An
        unknown setting is a ValueError that names it, not a silent default.
        """
        data = dict(data)
        bank = data.pop("bank", {}) or {}
        for kind, known, given in (("screener", cls.__dataclass_fields__, data),
                                   ("bank", BankConfig.__dataclass_fields__, bank)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"unknown {kind} setting(s) {unknown}; known: {sorted(known)}")
        if "augment" in data:  # JSON gives a list
            data["augment"] = tuple(data["augment"])
        return cls(**data, bank=BankConfig(**bank))


@dataclass
class ScreenResult:
    """One screened image: calibrated score in [0, 1], (H, W) map in [0, 1] at original resolution, label."""

    score: float
    anomaly_map: np.ndarray
    label: bool
    raw_score: float = 0.0
    unlikeness: float | None = None  # see MemoryBank.distance_map_and_unlikeness


class ReferenceScreener:
    """Few-shot, training-free screening of images against k reference normals of the same part.

    `fit` once, then `predict` from any number of threads: prediction writes nothing on the screener.
    """

    def __init__(self, source: FeatureSource, config: ScreenerConfig | None = None):
        self.source = source
        self.config = config or ScreenerConfig()
        self.bank = MemoryBank(self.config.bank)
        self.zoom_bank: MemoryBank | None = None
        self.scale: float | None = None

    # -- features --------------------------------------------------------------------------------------------
    def _prep(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        return [normalize_illumination(im, self.config.illumination) for im in images]

    def _extract(self, images: Sequence[Image.Image], scale: float | None) -> list[LevelGrids]:
        with _timed("extract"):
            return self.source(images, scale=scale)

    def fit(self, references: Sequence[Image.Image]) -> ReferenceScreener:
        """Build the bank (and the zoomed bank) from reference normal images."""
        refs = self._prep(references)
        if self.config.scale == "reference":
            area = float(np.median([im.size[0] * im.size[1] for im in refs]))
            self.scale = self.config.image_size / math.sqrt(area)
        elif self.config.scale != "source":
            raise ValueError(f"scale must be 'source' or 'reference', got {self.config.scale!r}")
        views, groups = self._augment(refs)
        levels = self._extract(views, self.scale)
        with _timed("match"):
            self.bank.fit(levels, groups)
        if self.config.zoom and self.config.zoom > 1:
            zs = self._zoom_scale(refs)
            zlevels = self._extract(views, zs)
            with _timed("match"):
                # crops have no fixed place on the part: no position profile for the zoomed bank
                self.zoom_bank = MemoryBank(replace(self.config.bank, position_norm=0)).fit(zlevels, groups)
        return self

    def _augment(self, refs: Sequence[Image.Image]) -> tuple[list[Image.Image], list[int]]:
        views, groups = list(refs), list(range(len(refs)))
        for a in self.config.augment:  # names checked by ScreenerConfig
            views += [im.transpose(FLIPS[a]) for im in refs]
            groups += list(range(len(refs)))
        return views, groups

    def _zoom_scale(self, images: Sequence[Image.Image]) -> float:
        if self.scale is not None:
            return self.scale * self.config.zoom
        area = float(np.median([im.size[0] * im.size[1] for im in images]))
        return self.config.image_size / math.sqrt(area) * self.config.zoom

    # -- prediction ------------------------------------------------------------------------------------------
    def predict(self, images: Sequence[Image.Image],
                threshold: float = DEFAULT_THRESHOLD) -> list[ScreenResult]:
        """Score images; maps come at each image's original (H, W), `label` decided at `threshold`."""
        prepped = self._prep(images)
        levels = self._extract(prepped, self.scale)
        with _timed("match"):
            # z-maps on each image grid, and how unlike the references each image is as a whole
            maps, unlike = [], []
            for lv in levels:
                d, u = self.bank.distance_map_and_unlikeness(lv)
                maps.append(d / self.bank.tau)
                unlike.append(u)
        # each map at its image's original size [H0, W0]
        full = [upsample_map(m, (im.size[1], im.size[0])) for m, im in zip(maps, images)]
        if self.zoom_bank is not None:
            full = self._second_look(prepped, full)
        out = []
        for z, u in zip(full, unlike):
            s = float(z.max()) if self.config.bank.score == "max" else float(
                reduce_score(z, self.config.bank.score, self.config.bank.topk)
            )
            score = float(calibrate(s))
            out.append(ScreenResult(score, calibrate(z).numpy().astype(np.float32),
                                    is_anomalous(score, threshold), s, u))
        return out

    def _second_look(self, images: Sequence[Image.Image], full: list[torch.Tensor]) -> list[torch.Tensor]:
        """Look again at the top regions, magnified `zoom`×; there the zoomed map replaces the coarse one."""
        c = self.config
        zs = self._zoom_scale(images)
        crops, where = [], []
        for i, (im, z) in enumerate(zip(images, full)):
            H, W = z.shape
            win = max(8, int(round(c.zoom_window * min(H, W))))
            zz = z.clone()
            for _ in range(c.zoom_regions):
                idx = int(torch.argmax(zz))
                cy, cx = divmod(idx, W)
                y0 = min(max(0, cy - win // 2), max(0, H - win))
                x0 = min(max(0, cx - win // 2), max(0, W - win))
                y1, x1 = min(H, y0 + win), min(W, x0 + win)
                crops.append(im.crop((x0, y0, x1, y1)))
                where.append((i, y0, y1, x0, x1))
                zz[y0:y1, x0:x1] = -1.0
        if not crops:
            return full
        levels = self._extract(crops, zs)
        out = [z.clone() for z in full]
        with _timed("match"):
            for lv, (i, y0, y1, x0, x1) in zip(levels, where):
                zm = self.zoom_bank.distance_map(lv) / self.zoom_bank.tau
                zm = upsample_map(zm, (y1 - y0, x1 - x0))
                out[i][y0:y1, x0:x1] = zm
        return out
