"""ExpertConfig: every size and constant of the anomaly expert, JSON-serialisable.

The config travels inside the HF model config later (as a plain dict), so it holds only JSON types
(ints, floats, strings, lists); tuples are normalised to lists on `to_dict` and back on `from_dict`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..images import FLIPS

# Same words (and order) as `backbones.LEVEL_WORDS`; a test pins the two together.
LEVEL_WORDS: tuple[str, str, str] = ("slightly suspicious", "moderately suspicious", "highly suspicious")
FEATURE_SOURCES: tuple[str, ...] = ("backbone", "efficientnet_lite0")


@dataclass
class ExpertConfig:
    """Sizes and constants of the anomaly expert (LTFM + VT selector + score head + projector).

    feature_source: where the level grids come from: "backbone" (the LLM's vision tower, Anomaly-OV's way) or
        "efficientnet_lite0" (the pretrained CNN of `expert/sources.py`). Only recorded here; the expert
        itself accepts any level grids whose channel counts match `level_dims`.
    source_options: keyword arguments that rebuild the feature source with the settings the expert was trained
        on, e.g. `EfficientNetLite0Config(**source_options)`
        ({"image_size": 256, "blocks": [4, 10], "pad": 16}), or the backbone's `levels` for "backbone".
        Saved with the expert so a checkpoint knows its features.
    level_dims: channels C_l of each level grid (Anomaly-OV: 4 x 1152 SigLIP widths).
    token_dim: D, width of the visual tokens v° the LLM sees (the selector's values and the output tokens).
    embed_dim: width of the matching space (Aᵢ, Gᵢ, e±, the selector's Q/K). Anomaly-OV: 512.
    class_code_dim: width of the look-back class code c. Anomaly-OV: 512.
    query_grid: g; the selector emits g² tokens plus the global token r, so K = 1 + g². Anomaly-OV: 2.
    logit_scale: cosine-similarity scale before the 2-way softmax. Anomaly-OV: 100.
    lookback_grid: the look-back's Linear mixes a fixed number of tokens (Anomaly-OV: 729 = 27²). Here v° is
        first adaptively average-pooled to lookback_grid x lookback_grid, so any token grid (and any aspect
        ratio) works; a grid smaller than lookback_grid is replicated by the same pooling.
    input_norm: apply a parameter-free LayerNorm to level features and to v° before the learned projections
        (not to the selector's values). Vision towers have outlier channels of very different scales per
        level; this keeps a 100x logit scale trainable. Beyond Anomaly-OV; set False for the paper's exact
        algebra.
    level_thresholds: score cut points for the level word: < t0 slightly, < t1 moderately, else highly.
    level_words: the three words, in order.
    map_fusion: weight of the reference-matching map when it is fused with a trained LTFM map
        (m = (1 - w) m_ltfm + w m_ref). An untrained LTFM is ignored and the reference map is used alone.
    score_fusion: the same weight for the image score.
    score_views: flipped views of the image ("hflip", "vflip") whose LTFM scores the assistant averages with
        the image's own before fusion (each view through the vision tower, so its features differ: less
        variance from a score head that is confidently wrong on one view). Empty: the image alone.
    llm_dim: output width of the projector into the LLM; None means token_dim (exact identity projector).
    score_hidden: hidden width of the score MLP; None means embed_dim.
    """

    feature_source: str = "backbone"
    source_options: dict[str, Any] = field(default_factory=dict)
    level_dims: list[int] = field(default_factory=lambda: [1152, 1152, 1152, 1152])
    token_dim: int = 1152
    embed_dim: int = 512
    class_code_dim: int = 512
    query_grid: int = 2
    logit_scale: float = 100.0
    lookback_grid: int = 27
    input_norm: bool = True
    level_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.7])
    level_words: list[str] = field(default_factory=lambda: list(LEVEL_WORDS))
    map_fusion: float = 0.5
    score_fusion: float = 0.5
    score_views: list[str] = field(default_factory=list)
    llm_dim: int | None = None
    score_hidden: int | None = None

    def __post_init__(self) -> None:
        self.level_dims = [int(d) for d in self.level_dims]
        self.source_options = json.loads(
            json.dumps(dict(self.source_options))
        )  # JSON types only (tuples -> lists)
        self.level_thresholds = [float(t) for t in self.level_thresholds]
        self.level_words = [str(w) for w in self.level_words]
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {self.feature_source!r}")
        if not self.level_dims:
            raise ValueError("level_dims needs at least one level")
        if self.query_grid < 1 or self.lookback_grid < 1:
            raise ValueError("query_grid and lookback_grid must be >= 1")
        t = self.level_thresholds
        if len(t) != 2 or not 0.0 <= t[0] <= t[1] <= 1.0:
            raise ValueError(f"level_thresholds must be two increasing values in [0, 1], got {t}")
        if len(self.level_words) != 3:
            raise ValueError("level_words needs exactly three words")
        for name in ("map_fusion", "score_fusion"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if isinstance(self.score_views, str) or any(v not in FLIPS for v in self.score_views):
            raise ValueError(f"score_views must list views among {list(FLIPS)}, got {self.score_views!r}")
        self.score_views = list(dict.fromkeys(self.score_views))

    @property
    def num_levels(self) -> int:
        return len(self.level_dims)

    @property
    def num_tokens(self) -> int:
        """K = 1 + g²: the global token r followed by the g x g selected tokens."""
        return 1 + self.query_grid**2

    @property
    def out_dim(self) -> int:
        """Width of the projected tokens."""
        return self.token_dim if self.llm_dim is None else self.llm_dim

    @classmethod
    def tiny(cls, **overrides: Any) -> ExpertConfig:
        """A few-thousand-parameter expert for tests and the embedded default."""
        base = {
            "level_dims": [16, 16],
            "token_dim": 32,
            "embed_dim": 16,
            "class_code_dim": 16,
            "lookback_grid": 4,
        }
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ExpertConfig keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ExpertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
