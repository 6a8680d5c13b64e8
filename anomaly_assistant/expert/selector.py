"""VT selector, score head and token projector (Anomaly-OV's second half).

The selector turns the significance map m into K = 1 + g² tokens that stay in v° space, so the LLM's own
projector (or our identity-initialised one) serves them exactly like ordinary visual tokens:

- queries q = AvgPool_{g×g}(v° ⊙ m) / AvgPool_{g×g}(m): m-weighted means of v° over a g x g grid of cells
  (adaptive pooling, so any token grid works);
- one-head attention with learned Q/K projections and *unprojected* values (v° itself), so each selected token
  is a convex combination of v° tokens;
- the global token r = Σ w·vˢ / Σ w with w = pooled m × σ, and the image score sigmoid(MLP(r)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExpertConfig

# Below this total weight an m-weighted mean falls back to the plain mean (exact ratio above it). A saturated
# 2-way softmax (scale 100) gives exact zeros; the double `where` keeps their gradients finite.
TINY = 1e-12


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Divide num by den where den > TINY, else take fallback; finite values and gradients everywhere."""
    ok = den > TINY
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), fallback)


class SelectorOutput(NamedTuple):
    """What `VTSelector.forward` returns: the tokens for the LLM plus the intermediates that made them."""

    tokens: torch.Tensor  # [B, K, D]: [r, vˢ_1 .. vˢ_{g²}] in v° space
    queries: torch.Tensor  # [B, g², D] m-weighted pooled v°
    attention: torch.Tensor  # [B, g², h*w]
    weights: torch.Tensor  # [B, g²] pooled m × σ


def weighted_pool(v0: torch.Tensor, m: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AvgPool(v°⊙m)/AvgPool(m) on a g x g grid; returns (queries [B, g², D], pooled m [B, g²]).

    Uniform m gives exactly the plain average pooling of v°.
    """
    x = v0.permute(0, 3, 1, 2)  # [B, D, h, w]
    mm = m[:, None]  # [B, 1, h, w]
    num = F.adaptive_avg_pool2d(x * mm, g)  # [B, D, g, g]
    plain = F.adaptive_avg_pool2d(x, g)  # [B, D, g, g]
    den = F.adaptive_avg_pool2d(mm, g)  # [B, 1, g, g]
    q = _safe_ratio(num, den, plain)  # [B, D, g, g]
    return q.flatten(2).transpose(1, 2), den.flatten(1)  # [B, g², D], [B, g²]


class VTSelector(nn.Module):
    """(v° (B, h, w, D), m (B, h, w), σ (B,)) -> K tokens in v° space."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.g = config.query_grid
        self.input_norm = config.input_norm
        self.q_proj = nn.Linear(config.token_dim, config.embed_dim)
        self.k_proj = nn.Linear(config.token_dim, config.embed_dim)

    def _n(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) if self.input_norm else x

    def forward(self, v0: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor) -> SelectorOutput:
        b, h, w, d = v0.shape
        values = v0.reshape(b, h * w, d)  # [B, N, D] unprojected
        q, pooled = weighted_pool(v0, m, self.g)  # [B, g², D], [B, g²]
        qk = self.q_proj(self._n(q))  # [B, g², E]
        kk = self.k_proj(self._n(values))  # [B, N, E]
        attn = torch.softmax(qk @ kk.transpose(1, 2) * qk.shape[-1] ** -0.5, dim=-1)  # [B, g², N]
        selected = attn @ values  # [B, g², D]
        wts = pooled * sigma[:, None]  # [B, g²]
        norm_w = _safe_ratio(
            wts, wts.sum(1, keepdim=True), torch.full_like(wts, 1.0 / wts.shape[1])
        )  # [B, g²]
        r = (norm_w[..., None] * selected).sum(1)  # [B, D]
        tokens = torch.cat([r[:, None], selected], dim=1)  # [B, K, D]
        return SelectorOutput(tokens, q, attn, wts)


class ScoreHead(nn.Module):
    """Global token r (B, D) -> image anomaly logit (B,); the score is its sigmoid."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        hidden = config.score_hidden or config.embed_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(config.token_dim),
            nn.Linear(config.token_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.mlp(r).squeeze(-1)  # [B]


class TokenProjector(nn.Module):
    """D -> D_llm linear map, identity-initialised: an untrained expert passes v°-space tokens unchanged.

    When D == D_llm it is exactly the identity; otherwise the weight is the rectangular identity (truncate or
    zero-pad channels) and the bias is zero.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        self.linear.weight.copy_(torch.eye(*self.linear.weight.shape))
        self.linear.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens)  # [..., K, D_llm]
