"""Look-Twice Feature Matching (LTFM), as in Anomaly-OV.

Look 1 (look-back): the whole image's final tokens v° give a class code c. Look 2 (matching): per level i the
adapted patch features uᵢ = normalize(Aᵢ(vᵢ)) are compared by cosine similarity (x logit_scale) with two
c-conditioned descriptors d±ᵢ = normalize(Gᵢ([e±; c])), where e⁺ describes normal and e⁻ abnormal patches; the
2-way softmax's abnormal channel is the level map mᵢ. Level maps are resized to the v° token grid and averaged
into m; σ = mean(m) is the image's overall significance.

All tensors here are batched over images of one shape; `AnomalyExpert` groups images by shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExpertConfig


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) maps to `size`: area averaging when shrinking both sides, bilinear otherwise.

    Area averaging keeps a map built on a finer grid (e.g. Qwen2.5-VL's 14-px patch grid, 2x the token grid)
    an exact mean of the patches each token covers.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _norm(x: torch.Tensor, on: bool) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) if on else x


class LTFMOutput(NamedTuple):
    """What `LTFM.forward` returns, by name: per-level maps, their mean m, σ and the class code c."""

    level_maps: torch.Tensor  # [B, L, h, w] abnormal probability per level, on the v° grid
    anomaly_map: torch.Tensor  # [B, h, w] mean over levels
    significance: torch.Tensor  # [B] σ = mean(m)
    class_code: torch.Tensor  # [B, class_code_dim]


class LookBack(nn.Module):
    """v° (B, h, w, D) -> class code c (B, class_code_dim).

    Anomaly-OV mixes the 729 tokens of a 27x27 grid with one Linear; any grid is first adaptively pooled to
    lookback_grid² tokens so the same weights serve every image size.
    """

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.grid = config.lookback_grid
        self.input_norm = config.input_norm
        self.token_mix = nn.Linear(self.grid**2, 1)
        self.mlp = nn.Sequential(
            nn.Linear(config.token_dim, config.class_code_dim),
            nn.GELU(),
            nn.Linear(config.class_code_dim, config.class_code_dim),
        )

    def forward(self, v0: torch.Tensor) -> torch.Tensor:
        x = _norm(v0, self.input_norm).permute(0, 3, 1, 2)  # [B, D, h, w]
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2)  # [B, D, G²]
        x = self.token_mix(x).squeeze(-1)  # [B, D]
        return self.mlp(x)  # [B, class_code_dim]


class LTFM(nn.Module):
    """Multi-level patch features + v° -> level maps, fused map m and significance σ."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        self.lookback = LookBack(config)
        # Row 0: e⁺ (normal), row 1: e⁻ (abnormal). Softmax channel 1 is the anomaly map.
        self.descriptors = nn.Parameter(torch.randn(2, e) * e**-0.5)  # [2, E]
        self.generators = nn.ModuleList(
            nn.Linear(e + config.class_code_dim, e) for _ in config.level_dims
        )  # Gᵢ
        self.adapters = nn.ModuleList(nn.Linear(c, e) for c in config.level_dims)  # Aᵢ

    def level_logits(self, levels: torch.Tensor, which: Sequence[int],
                     class_code: torch.Tensor) -> torch.Tensor:
        """Levels `which` stacked (L, B, H, W, C) -> (L, B, H, W, 2): scaled cosine logits against [d⁺, d⁻].

        Each level uses its own generator Gᵢ and adapter Aᵢ; their weights are stacked so that a ViT tower's
        equally shaped levels cost one pass of a few ops instead of L passes (on a small backbone the expert's
        share of a training step is mostly per-op overhead). A CNN's levels differ in shape: one call each.
        """
        n, b, h, w, _ = levels.shape
        adapters = [self.adapters[i] for i in which]
        generators = [self.generators[i] for i in which]
        adapter_w = torch.stack([a.weight for a in adapters]).transpose(1, 2)  # [L, C, E]
        adapter_b = torch.stack([a.bias for a in adapters])[:, None]  # [L, 1, E]
        generator_w = torch.stack([g.weight for g in generators]).transpose(1, 2)  # [L, E + Cc, E]
        generator_b = torch.stack([g.bias for g in generators])[:, None]  # [L, 1, E]
        e = self.descriptors[None].expand(b, -1, -1)  # [B, 2, E]
        c = class_code[:, None].expand(-1, 2, -1)  # [B, 2, Cc]
        code = torch.cat([e, c], dim=-1).reshape(1, b * 2, -1).expand(n, -1, -1)  # [L, B*2, E + Cc]
        d = F.normalize(torch.baddbmm(generator_b, code, generator_w), dim=-1)  # [L, B*2, E]
        x = _norm(levels, self.config.input_norm).reshape(n, b * h * w, -1)  # [L, B*H*W, C]
        u = F.normalize(torch.baddbmm(adapter_b, x, adapter_w), dim=-1)  # [L, B*H*W, E]
        d = d.reshape(n * b, 2, -1).transpose(1, 2)  # [L*B, E, 2]
        logits = torch.bmm(u.reshape(n * b, h * w, -1), d)  # [L*B, H*W, 2]
        return self.config.logit_scale * logits.reshape(n, b, h, w, 2)

    def forward(self, levels: list[torch.Tensor], v0: torch.Tensor) -> LTFMOutput:
        if len(levels) != self.config.num_levels:
            raise ValueError(f"expected {self.config.num_levels} levels, got {len(levels)}")
        for i, level in enumerate(levels):
            if level.shape[-1] != self.config.level_dims[i]:
                raise ValueError(
                    f"level {i} has {level.shape[-1]} channels, config says {self.config.level_dims[i]}"
                )
        grid = tuple(v0.shape[1:3])
        class_code = self.lookback(v0)  # [B, Cc]
        if all(level.shape == levels[0].shape for level in levels):  # a ViT tower: one stacked pass
            logits = self.level_logits(torch.stack(levels), range(len(levels)), class_code)
            prob = logits.softmax(-1)[..., 1]  # [L, B, H, W]
            level_maps = resize_map(prob.transpose(0, 1), grid)  # [B, L, h, w]
        else:  # a CNN's levels differ in size and channels
            maps = []
            for i, level in enumerate(levels):
                prob = self.level_logits(level[None], [i], class_code)[0].softmax(-1)[..., 1]  # [B, H, W]
                maps.append(resize_map(prob[:, None], grid)[:, 0])  # [B, h, w]
            level_maps = torch.stack(maps, dim=1)  # [B, L, h, w]
        m = level_maps.mean(1)  # [B, h, w]
        return LTFMOutput(level_maps, m, m.flatten(1).mean(1), class_code)
