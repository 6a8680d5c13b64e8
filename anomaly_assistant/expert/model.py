"""AnomalyExpert: LTFM + reference matching + VT selector + score head + projector, per image or batch.

Inputs per image are what the feature sources and backbones produce: a list of level grids (H_l, W_l, C_l) and
the visual tokens v° as an (h, w, D) grid. Everything is resized to the v° grid, so K = 1 + g² tokens come out
whatever the image size.

Which cue drives the map (`ExpertOutput.map_source`):

| LTFM trained (or use_ltfm=True) | has reference | map_source       | published map / score                 |
|---------------------------------|---------------|------------------|---------------------------------------|
| yes                             | no            | "ltfm"           | LTFM map, sigmoid(score head)         |
| yes                             | yes           | "ltfm+reference" | (1-w) LTFM + w ref (map/score_fusion) |
| no                              | yes           | "reference"      | reference map and score alone         |
| no                              | no            | "none"           | None (anomaly_map, score, level_word) |

The LTFM score in rows 1-2 is the score head's probability, averaged with the flipped views' when the call
passes them (`view_scores`; `ExpertConfig.score_views`); `score_logit` stays the image's own, for training.

The selector, the score head and so the K tokens read the LTFM map whenever it drives (rows 1-2): every
training stage (stage 1, stage 1b, `expert fit`, SFT, GRPO) runs without references, so selecting on the
reference-weighted map handed the score head input it never saw. On SynthInspect seed 4242 (108 images, 4
references, the default model) the LTFM score ranked at image AUROC 0.907 that way and 0.979 on its own map,
and the fused score's detection F1 went 0.904 -> 0.962.

An untrained LTFM's map is noise, so the expert says "none" instead of publishing it; the selector then runs
on a uniform m (queries = plain g x g average pools of v°, r = the mean of the selected tokens), so K tokens
still carry the image but no false anomaly cue. `trained` is a persistent buffer: stage-1 training sets it
(`mark_trained`), and `from_pretrained` restores it. Training itself calls the expert with `use_ltfm=True`, so
the LTFM map drives the selector (and gets gradients) before that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import torch
from torch import nn

from .config import ExpertConfig
from .ltfm import LTFM, resize_map
from .selector import ScoreHead, TokenProjector, VTSelector

CONFIG_NAME = "expert_config.json"
WEIGHTS_NAME = "expert.safetensors"

MAP_SOURCES: tuple[str, ...] = ("ltfm", "ltfm+reference", "reference", "none")


def level_word(
    score: float, thresholds: Sequence[float] = (0.3, 0.7), words: Sequence[str] | None = None
) -> str:
    """Score in [0, 1] -> the level word: < t0 slightly, < t1 moderately, else highly.

    The default cut points are Anomaly-OV's.
    """
    from .config import LEVEL_WORDS

    words = LEVEL_WORDS if words is None else words
    s = float(score)
    if s < thresholds[0]:
        return words[0]
    if s < thresholds[1]:
        return words[1]
    return words[2]


@dataclass
class ReferenceMatch:
    """A reference-matching result for one image: map (H, W) in [0, 1] on any grid, score in [0, 1]."""

    anomaly_map: torch.Tensor
    score: float
    unlikeness: float | None = None  # how unlike its references the image is as a whole (reference_warning)


class DistanceBank(Protocol):
    """What the expert needs from `expert.reference.MemoryBank` (a fitted bank on the same feature source)."""

    tau: float

    def distance_map(self, levels: list[torch.Tensor]) -> torch.Tensor: ...

    def score(self, dist_map: torch.Tensor) -> float: ...


Reference = Union[ReferenceMatch, DistanceBank]  # noqa: UP007 (a runtime alias; py3.10 has no | on Protocols)


def match_reference(reference: Any, levels: list[torch.Tensor]) -> ReferenceMatch:
    """A reference cue -> calibrated map and score in [0, 1].

    Accepts a fitted `reference.MemoryBank` (matched here against this image's levels, so it must be fitted on
    the same feature source), a `ReferenceScreener` (its bank), a `ReferenceMatch`, or any result with
    `anomaly_map` and `score` (e.g. a `reference.ScreenResult` computed on the original image, whatever
    features the expert reads). Bank distances use the bank's leave-one-out calibration (z = distance / tau,
    z²/(1+z²)): 0.5 means "as unusual as the least typical reference looks to the others", on the LTFM
    probabilities' scale.
    """
    if isinstance(reference, ReferenceMatch):
        return reference
    bank = getattr(reference, "bank", reference)
    if not hasattr(bank, "distance_map"):
        if hasattr(reference, "anomaly_map") and hasattr(reference, "score"):
            amap = torch.as_tensor(reference.anomaly_map, dtype=torch.float32)
            return ReferenceMatch(amap, float(reference.score))
        raise TypeError(f"not a reference: {type(reference).__name__}")
    from .reference import calibrate

    feats = getattr(bank, "features", None)
    width = sum(int(lv.shape[-1]) for lv in levels)
    if feats is not None and feats.shape[-1] != width:
        raise ValueError(
            f"the reference bank holds {feats.shape[-1]}-d patches but this image's levels give {width}: "
            "fit the bank on the same feature source (and levels) as the expert reads"
        )
    dist = bank.distance_map([lv.detach().float() for lv in levels])  # [H, W]
    tau = max(float(bank.tau), 1e-12)
    return ReferenceMatch(calibrate(dist / tau), float(calibrate(bank.score(dist) / tau)))


@dataclass
class ExpertOutput:
    """One image's expert result. Fields for display are None when `map_source == "none"`.

    anomaly_map: (h, w) in [0, 1] on the v° grid: the map the product shows (see the module table).
    score: () in [0, 1]: the image score the product shows.
    level_word: "slightly/moderately/highly suspicious" from `score`.
    tokens: (K, D) [r, vˢ_1 .. vˢ_{g²}] in v° space; projected_tokens: (K, D_llm) after the projector.
    map_source: "ltfm" | "ltfm+reference" | "reference" | "none"; `meaningful` is map_source != "none".
    level_maps: (L, h, w) raw LTFM level maps; ltfm_map: (h, w) their mean; score_logit: () score-head logit.
        These are always computed (trained or not) and carry gradients: stage-1 losses read them.
    significance: () σ = mean of the map the selector used (the LTFM map when it drives, else the published).
    reference_map / reference_score: the calibrated reference cue on the v° grid, when a reference was given.
    """

    anomaly_map: torch.Tensor | None
    score: torch.Tensor | None
    level_word: str | None
    tokens: torch.Tensor
    projected_tokens: torch.Tensor
    map_source: str
    level_maps: torch.Tensor
    ltfm_map: torch.Tensor
    score_logit: torch.Tensor
    significance: torch.Tensor
    reference_map: torch.Tensor | None = None
    reference_score: float | None = None
    ltfm_score: torch.Tensor | None = None  # sigmoid(score_logit), averaged with its flipped views'

    def detach(self) -> ExpertOutput:
        """A copy with every tensor detached.

        For records, display and `float()` without autograd warnings.
        """
        return ExpertOutput(**{k: v.detach() if torch.is_tensor(v) else v for k, v in self.__dict__.items()})

    @property
    def meaningful(self) -> bool:
        return self.map_source != "none"

    @property
    def note(self) -> str:
        """A plain-language statement of where the map comes from (for logs and the UI)."""
        return {
            "ltfm": "anomaly map from the trained expert",
            "ltfm+reference": "anomaly map from the trained expert fused with reference matching",
            "reference": "anomaly map from reference matching only (the expert is untrained)",
            "none": "no anomaly map: the expert is untrained and no reference images were given",
        }[self.map_source]


class AnomalyExpert(nn.Module):
    """The anomaly expert (Anomaly-OV's LTFM + VT selector + score head), reference fusion and a projector."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.config = config
        self.ltfm = LTFM(config)
        self.selector = VTSelector(config)
        self.score_head = ScoreHead(config)
        self.projector = TokenProjector(config.token_dim, config.out_dim)
        self.register_buffer("trained", torch.tensor(False))

    @torch.no_grad()
    def reset_parameters(self) -> AnomalyExpert:
        """Re-apply the expert's own initialisation (and clear `trained`).

        A host model's generic weight init (e.g. an HF `_init_weights` that redraws every nn.Linear) would
        break the identity projector and the descriptor scale; call this on the expert after such an init.
        """
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.LayerNorm)):
                mod.reset_parameters()
        e = self.config.embed_dim
        self.ltfm.descriptors.normal_(0.0, e**-0.5)
        self.projector.reset_identity()
        self.trained.fill_(False)
        return self

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return bool(self.trained)

    def mark_trained(self, flag: bool = True) -> AnomalyExpert:
        """Record that the LTFM and score head have been trained (stage 1 calls this; it is saved)."""
        self.trained.fill_(bool(flag))
        return self

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def level_word(self, score: float) -> str:
        return level_word(score, self.config.level_thresholds, self.config.level_words)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        levels: Sequence[torch.Tensor],
        v0: torch.Tensor | None = None,
        reference: Reference | None = None,
        use_ltfm: bool | None = None,
    ) -> ExpertOutput:
        """One image: levels [(H_l, W_l, C_l)], v° (h, w, D) (None: the last level), optional reference.

        use_ltfm: None follows the `trained` buffer; stage-1 training passes True so that the LTFM map drives
        the selector and the score head (and receives their gradients) before the expert is marked trained.
        """
        return self.forward_batch([levels], [v0], [reference], use_ltfm=use_ltfm)[0]

    def forward_batch(
        self,
        levels: Sequence[Sequence[torch.Tensor]],
        v0: Sequence[torch.Tensor | None] | None = None,
        reference: Reference | Sequence[Reference | None] | None = None,
        use_ltfm: bool | None = None,
        view_scores: Sequence[Sequence[float] | None] | None = None,
    ) -> list[ExpertOutput]:
        """Several images of possibly different sizes; images with equal shapes share one batched pass.

        `reference` is one reference for all images, or one (or None) per image. `view_scores`: per image,
        the LTFM scores of its flipped views (`ExpertConfig.score_views`), averaged with its own, then fused.
        """
        n = len(levels)
        v0s = list(v0) if v0 is not None else [None] * n
        if isinstance(reference, (list, tuple)):
            refs = list(reference)
        else:
            refs = [reference] * n
        views = list(view_scores) if view_scores is not None else [None] * n
        if len(v0s) != n or len(refs) != n or len(views) != n:
            raise ValueError("levels, v0, reference and view_scores must have one entry per image")
        dtype = self.projector.linear.weight.dtype
        device = self.projector.linear.weight.device
        lv = [[torch.as_tensor(g).to(device, dtype) for g in img] for img in levels]
        vv = []
        for img, v in zip(lv, v0s):
            if v is None:
                v = img[-1]
            vv.append(torch.as_tensor(v).to(device, dtype))
        for v in vv:
            if v.ndim != 3 or v.shape[-1] != self.config.token_dim:
                raise ValueError(f"v° must be (h, w, {self.config.token_dim}), got {tuple(v.shape)}")
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            key = (tuple(tuple(g.shape) for g in lv[i]), tuple(vv[i].shape))
            groups.setdefault(key, []).append(i)
        out: list[ExpertOutput | None] = [None] * n
        for idx in groups.values():
            res = self._run(
                [torch.stack([lv[i][j] for i in idx]) for j in range(len(lv[idx[0]]))],
                torch.stack([vv[i] for i in idx]),
                [None if refs[i] is None else match_reference(refs[i], lv[i]) for i in idx],
                self.is_trained if use_ltfm is None else bool(use_ltfm),
                [views[i] for i in idx],
            )
            for i, r in zip(idx, res):
                out[i] = r
        return out  # type: ignore[return-value]

    def _run(
        self, levels: list[torch.Tensor], v0: torch.Tensor, refs: list[ReferenceMatch | None], use_ltfm: bool,
        views: list[Sequence[float] | None],
    ) -> list[ExpertOutput]:
        """Batched core: levels [B, H_l, W_l, C_l], v0 [B, h, w, D]; per image a reference match and views."""
        c = self.config
        h, w = v0.shape[1:3]
        lt = self.ltfm(levels, v0)  # level_maps [B, L, h, w], anomaly_map [B, h, w]
        maps, sources, ref_maps = [], [], []
        for i, ref in enumerate(refs):
            rm = None
            if ref is not None:
                rm = resize_map(ref.anomaly_map.to(v0)[None, None], (h, w))[0, 0].clamp(0, 1)  # [h, w]
            ref_maps.append(rm)
            if rm is not None and use_ltfm:
                maps.append((1 - c.map_fusion) * lt.anomaly_map[i] + c.map_fusion * rm)
                sources.append("ltfm+reference")
            elif rm is not None:
                maps.append(rm)
                sources.append("reference")
            elif use_ltfm:
                maps.append(lt.anomaly_map[i])
                sources.append("ltfm")
            else:
                maps.append(torch.ones_like(lt.anomaly_map[i]))
                sources.append("none")
        m = torch.stack(maps)  # [B, h, w]
        # The selector (and so the score head and the LLM's tokens) reads the LTFM map whenever the LTFM
        # drives: training never shows it a reference, so a reference-weighted selection is input it never
        # saw (module docstring). A reference enters the published map and score by fusion only.
        picked = lt.anomaly_map if use_ltfm else m
        sigma = picked.flatten(1).mean(1)  # [B]
        sel = self.selector(v0, picked, sigma)  # tokens [B, K, D]
        logit = self.score_head(sel.tokens[:, 0])  # [B]
        projected = self.projector(sel.tokens)  # [B, K, D_llm]
        results = []
        for i, src in enumerate(sources):
            ltfm_score = torch.sigmoid(logit[i])
            if views[i]:  # the image's own score and its flipped views', equally weighted
                ltfm_score = (ltfm_score + float(sum(views[i]))) / (1 + len(views[i]))
            ref = refs[i]
            if src == "ltfm":
                score = ltfm_score
            elif src == "ltfm+reference":
                score = (1 - c.score_fusion) * ltfm_score + c.score_fusion * torch.as_tensor(ref.score).to(
                    logit
                )
            elif src == "reference":
                score = torch.as_tensor(float(ref.score)).to(logit)
            else:
                score = None
            results.append(
                ExpertOutput(
                    anomaly_map=None if src == "none" else m[i],
                    score=score,
                    level_word=None if score is None else self.level_word(float(score.detach())),
                    tokens=sel.tokens[i],
                    projected_tokens=projected[i],
                    map_source=src,
                    level_maps=lt.level_maps[i],
                    ltfm_map=lt.anomaly_map[i],
                    score_logit=logit[i],
                    significance=sigma[i],
                    reference_map=ref_maps[i],
                    reference_score=None if ref is None else float(ref.score),
                    ltfm_score=ltfm_score,
                )
            )
        return results

    # -- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `expert_config.json` + `expert.safetensors` (no pickle) into `directory`."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.save(d / CONFIG_NAME)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "kind": "anomaly_expert"})
        return d

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> AnomalyExpert:
        """Rebuild from `save_pretrained`'s files, in eval mode.

        dtype: None keeps the saved floating dtype; `overrides` patch config fields that do not change shapes.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        config = ExpertConfig.load(d / CONFIG_NAME)
        if overrides:
            config = ExpertConfig.from_dict({**config.to_dict(), **overrides})
        state = load_file(str(d / WEIGHTS_NAME), device=str(device))
        if dtype is None:
            dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        model = cls(config).to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True)
        return model.eval()
