"""LLaVA-1.5 (CLIP tower + Llama LLM): chat template, processor, raster features, input frame, tiny config.

Also the real checkpoints' resize rule (`IMAGE_SIZE`: shortest edge, then a centre crop) and the family's
anomaly classes.

CLIP puts a CLS token before the raster patch tokens; levels and v° drop it. v° is the projector output of
`hidden_states[vision_feature_layer]` (real: -2), exactly the tokens the LLM sees (offset 0 in the run).
The image reaches the tower after a shortest-edge resize and a centre crop, so boxes live in the crop's frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel, LlavaProcessor
from transformers.image_transforms import get_resize_output_image_size
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .. import efficientnet_tower  # noqa: F401  (registers the EfficientNet-Lite0 tower the default model uses)
from ..finding import Frame
from ..injection import AnomalyConfigFields, AnomalyInnerMixin, AnomalyOuterMixin, anomaly_forward
from ..processing import AnomalyBlockMixin
from . import (
    TEMPLATE_MESSAGE_PARTS,
    VisionFeatures,
    check_placeholders,
    load_pretrained,
    resolve_levels,
    spread_levels,
)

FAMILY = "llava"
CONFIG_CLASS = LlavaConfig
MODEL_CLASS = LlavaForConditionalGeneration
PROCESSOR_CLASS = LlavaProcessor  # no video slot: transformers' own works as is
IMAGE_TOKEN = "<image>"
EOS_TOKEN, PAD_TOKEN = "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<pad>", "<image>")
# The real checkpoints' resize rule (llava-hf/llava-1.5-*-hf): shortest edge to 336 px, then a 336 px centre
# crop, 14-px patches. The one home of these values.
IMAGE_SIZE, PATCH_SIZE = 336, 14
TINY_IMAGE_SIZE = 112  # 8x8 patch tokens of 14 px
# CLIP ViT-L/14 levels used by AnomalyCLIP / WinCLIP-style detectors: layers 6, 12, 18, 24.
CLIP_L_LEVELS = (6, 12, 18, 24)

# Vicuna-style "USER: ... ASSISTANT: ..." as in llava-hf/llava-1.5-*-hf (images first, then text), extended to
# string contents, with {% generation %} markers around the assistant text and its </s>. The generation prompt
# ends in "ASSISTANT:" and the answer carries its leading space, as in LLaVA-1.5's own conversations.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + TEMPLATE_MESSAGE_PARTS +
    "{%- if message['role'] == 'system' -%}{{- texts | join(' ') + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' + texts | join(' ') + '</s>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- 'USER: ' -}}{%- for _ in range(n_images) -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- texts | join(' ') + ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def build_image_processor(image_size: int = IMAGE_SIZE) -> CLIPImageProcessorPil:
    """The PIL CLIP image processor (shortest edge, then centre crop); by default the real one's."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_processor(
    tokenizer: Any, chat_template: str | None = CHAT_TEMPLATE, image_size: int = IMAGE_SIZE
) -> LlavaProcessor:
    """LlavaProcessor over the PIL CLIP image processor; by default it resizes like the real checkpoints."""
    return LlavaProcessor(
        image_processor=build_image_processor(image_size), tokenizer=tokenizer, chat_template=chat_template,
        patch_size=PATCH_SIZE, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def build_tiny_processor(tokenizer: Any) -> LlavaProcessor:
    """The tiny models' processor: the real rule at 112 px."""
    return build_processor(tokenizer, image_size=TINY_IMAGE_SIZE)


# (model, processor) from a hub id or local directory; see `backbones.load_pretrained`.
load = partial(load_pretrained, MODEL_CLASS, PROCESSOR_CLASS)


def tiny_config(tokenizer: Any, text: dict) -> LlavaConfig:
    """The tiny test config: `text` holds the tiny LLM's sizes (a Llama); a 4-layer CLIP on 112-px crops."""
    return LlavaConfig(
        text_config=dict(model_type="llama", **text),
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE,
            "patch_size": PATCH_SIZE, "projection_dim": 32,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def default_levels(config: Any) -> tuple[int, ...]:
    """CLIP-L's 6/12/18/24 on the real 24-layer tower; four levels spread over the depth otherwise."""
    vc = getattr(config, "vision_config", config)
    depth = int(vc.num_hidden_layers)
    return CLIP_L_LEVELS if depth == 24 else spread_levels(depth)


def vision_features(model: Any, inputs: dict, levels: Sequence[int] | None = None) -> VisionFeatures:
    """CLIP levels as (H, W, C) raster grids (CLS dropped) and v° = projector output as (H, W, D)."""
    inner = model.model
    cfg = model.config
    pixel_values = inputs["pixel_values"].to(inner.vision_tower.dtype)  # [B, 3, S, S]
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states  # depth+1 x [B, 1 + N, C]
    chosen = resolve_levels(levels, default_levels(cfg), len(hidden))
    side_h = pixel_values.shape[-2] // cfg.vision_config.patch_size
    side_w = pixel_values.shape[-1] // cfg.vision_config.patch_size
    drop = 1 if cfg.vision_feature_select_strategy == "default" else 0

    layer = cfg.vision_feature_layer
    selected = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
    projected = inner.multi_modal_projector(selected[:, drop:])  # [B, N, D]

    n = pixel_values.shape[0]
    level_grids = [[hidden[lv][i, 1:].reshape(side_h, side_w, -1) for lv in chosen]  # CLS dropped
                   for i in range(n)]
    image_embeds = [projected[i] for i in range(n)]  # [N, D] raster
    v0 = [e.reshape(side_h, side_w, -1) for e in image_embeds]
    n_tokens = [e.shape[0] for e in image_embeds]
    check_placeholders(inputs, model, n_tokens)
    return VisionFeatures(
        family=FAMILY, levels=chosen, level_grids=level_grids, v0=v0, image_embeds=image_embeds,
        num_image_tokens=n_tokens, v0_offset=[0] * n,
    )


def input_sizes(processor: Any, original_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized w, h), (crop w, h)) by the image processor's own resize rule and crop size."""
    ip = getattr(processor, "image_processor", processor)
    w, h = original_size
    size = ip.size
    if size.get("shortest_edge"):
        dummy = np.broadcast_to(np.zeros((), np.uint8), (1, h, w))  # only its shape is read
        rh, rw = get_resize_output_image_size(dummy, size["shortest_edge"], default_to_square=False,
                                              input_data_format="channels_first")
    else:
        rh, rw = size["height"], size["width"]
    if not ip.do_center_crop:
        return (rw, rh), (rw, rh)
    return (rw, rh), (int(ip.crop_size["width"]), int(ip.crop_size["height"]))


def input_frame(processor: Any, original_size: tuple[int, int]) -> Frame:
    """Original pixels -> the centre crop of the shortest-edge-resized image (CLIP preprocessing)."""
    resized, crop = input_sizes(processor, original_size)
    return Frame.resize_then_center_crop(tuple(original_size), resized, crop)


def embeds_forward_kwargs(inputs: dict, inputs_embeds: torch.Tensor) -> dict:
    """Model kwargs for a forward on precomputed `inputs_embeds` (see `backbones.embed_inputs`).

    Positions are plain 1-D, so only the mask travels along; the vision tower is not run again.
    """
    return {k: inputs[k] for k in ("attention_mask",) if k in inputs} | {"inputs_embeds": inputs_embeds}


# ------------------------------------------------------------------------------------------------------------
# The family's anomaly classes (the mechanism: `injection`); their `model_type` strings are in checkpoints.
# ------------------------------------------------------------------------------------------------------------
class AnomalyLlavaConfig(AnomalyConfigFields, LlavaConfig):
    """LLaVA-1.5's config with the expert's settings and the anomaly token ids."""

    model_type = "anomaly_llava"


class AnomalyLlavaModel(AnomalyInnerMixin, LlavaModel):
    """LLaVA-1.5's inner model with the expert in its forward."""

    family = FAMILY


class AnomalyLlavaForConditionalGeneration(AnomalyOuterMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with the anomaly expert."""

    config_class = AnomalyLlavaConfig
    family = FAMILY
    inner_class = AnomalyLlavaModel
    forward = anomaly_forward(LlavaForConditionalGeneration)


class AnomalyLlavaProcessor(AnomalyBlockMixin, LlavaProcessor):
    """LLaVA-1.5 processor with the anomaly block after `<image>`."""

    placeholder = IMAGE_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, patch_size=None,
                 vision_feature_select_strategy=None, chat_template=None, num_additional_image_tokens=0,
                 num_anomaly_tokens: int = 5, expert_image_size: int | None = None, **kwargs):
        self.num_anomaly_tokens = int(num_anomaly_tokens)
        self.expert_image_size = expert_image_size
        super().__init__(image_processor, tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, num_additional_image_tokens=num_additional_image_tokens,
                         **kwargs)


ANOMALY_CONFIG_CLASS = AnomalyLlavaConfig
ANOMALY_MODEL_CLASS = AnomalyLlavaForConditionalGeneration
ANOMALY_PROCESSOR_CLASS = AnomalyLlavaProcessor
