"""LLaVA-OneVision (SigLIP + Qwen2): chat template, image-only processor, features, frame, tiny config.

Also the real checkpoints' resize rule (`IMAGE_SIZE`, anyres pinpoints of the image processor) and the
family's anomaly classes.

Choice of v° and levels: the base view. A single image reaches the LLM as [base view tokens (the whole image
squashed to the tower's square size, row-major), then the anyres crops' tokens (unpadded, one newline token
per row)]. The expert reads the base view: it covers the whole image in one fixed (S/p x S/p) grid, is the
first `(S/p)^2` placeholder tokens of each image (offset 0), and its boxes frame is the squashed image. The
anyres crops are only for the LLM (their per-crop levels are available with `crops=True`, see
`vision_features`). Several images in one sample (batch_num_images > 1) are not anyres-split by transformers:
each is padded to a square and gives base tokens + one newline; `input_frame(..., multi_image=True)` gives
that frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from functools import partial
from typing import Any

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

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

FAMILY = "llava_onevision"
CONFIG_CLASS = LlavaOnevisionConfig
MODEL_CLASS = LlavaOnevisionForConditionalGeneration
IMAGE_TOKEN = "<image>"
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
# The real checkpoints' base view (llava-hf/llava-onevision-qwen2-*-ov-hf): SigLIP's 384 px square, 14-px
# patches; their anyres pinpoints are the image processor's defaults. The one home of these values.
IMAGE_SIZE, PATCH_SIZE = 384, 14
TINY_IMAGE_SIZE = 112  # 8x8 base tokens of 14 px
TINY_GRID_PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224]]
# Anomaly-OV's levels on SigLIP-so400m (27 layers): hidden_states[7, 13, 19, 25].
ANOMALY_OV_LEVELS = (7, 13, 19, 25)

# ChatML as in llava-hf/llava-onevision-qwen2-*-ov-hf for user/system turns ("<|im_start|>user
# <image>\ntext"), extended to string contents; assistant turns open exactly like the generation prompt
# ("<|im_start|>assistant\n") so training and inference see the same prefix, with {% generation %} around the
# text and its <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + TEMPLATE_MESSAGE_PARTS +
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- texts | join('\\n') + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + ' ' -}}"
    "{%- for _ in range(n_images) -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- for t in texts -%}{{- '\\n' + t -}}{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision processor without the video slot (builds and loads without torchvision)."""

    def __init__(
        self, image_processor=None, tokenizer=None, num_image_tokens=None,
        vision_feature_select_strategy=None, chat_template=None, image_token="<image>", video_token="<video>",
        vision_aspect_ratio="anyres_max_9", **kwargs,
    ):
        kwargs.pop("video_processor", None)
        super().__init__(
            image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


PROCESSOR_CLASS = ImageOnlyLlavaOnevisionProcessor


def build_image_processor(
    image_size: int = IMAGE_SIZE, grid_pinpoints: list[list[int]] | None = None
) -> LlavaOnevisionImageProcessorPil:
    """The PIL image processor (base view `image_size`, anyres `grid_pinpoints`); by default the real's."""
    kwargs: dict[str, Any] = {"size": {"height": image_size, "width": image_size}}
    if grid_pinpoints is not None:
        kwargs["image_grid_pinpoints"] = grid_pinpoints
    return LlavaOnevisionImageProcessorPil(**kwargs)


def build_processor(
    tokenizer: Any, chat_template: str | None = CHAT_TEMPLATE, image_size: int = IMAGE_SIZE,
    grid_pinpoints: list[list[int]] | None = None, vision_feature_select_strategy: str = "full",
) -> ImageOnlyLlavaOnevisionProcessor:
    """The image-only processor; by default it resizes like the real checkpoints."""
    return ImageOnlyLlavaOnevisionProcessor(
        image_processor=build_image_processor(image_size, grid_pinpoints), tokenizer=tokenizer,
        chat_template=chat_template, num_image_tokens=(image_size // PATCH_SIZE) ** 2,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )


def build_tiny_processor(tokenizer: Any) -> ImageOnlyLlavaOnevisionProcessor:
    """The tiny models' processor: the real rule with 112-px views and 112/224-px anyres grids."""
    return build_processor(tokenizer, image_size=TINY_IMAGE_SIZE, grid_pinpoints=TINY_GRID_PINPOINTS)


# (model, processor) from a hub id or local directory; see `backbones.load_pretrained`. The processor loads
# through the image-only class (AutoProcessor would need torchvision for a real checkpoint's processor
# files).
load = partial(load_pretrained, MODEL_CLASS, PROCESSOR_CLASS)


def tiny_config(tokenizer: Any, text: dict) -> LlavaOnevisionConfig:
    """The tiny test config: `text` holds the tiny LLM's sizes (a Qwen2); a 4-layer SigLIP on 112-px views."""
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text),
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        image_token_id=ids("<image>"), video_token_id=ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=TINY_GRID_PINPOINTS, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def default_levels(config: Any) -> tuple[int, ...]:
    """Anomaly-OV's SigLIP levels on the real tower; four levels spread over the depth otherwise."""
    vc = getattr(config, "vision_config", config)
    depth = int(vc.num_hidden_layers)
    return ANOMALY_OV_LEVELS if depth >= 26 else spread_levels(depth)


def _num_crops(model: Any, inputs: dict) -> list[int]:
    """Views per image in pixel_values (base + anyres crops), by the model's own rule."""
    cfg = model.config
    sizes = inputs["image_sizes"]
    bni = inputs.get("batch_num_images")
    patching = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
    return [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
        for s, p in zip(sizes, patching)
    ]


def vision_features(
    model: Any, inputs: dict, levels: Sequence[int] | None = None, crops: bool = False
) -> VisionFeatures:
    """Base-view SigLIP levels as (S/p, S/p, C) grids and v° = the projected base view (S/p, S/p, D).

    With `crops=True`, `extras["crop_level_grids"][i][j]` holds image i's level j for every view (base first)
    as (n_views, S/p, S/p, C).
    """
    inner = model.model
    cfg = model.config
    n_views = _num_crops(model, inputs)
    pixel_values = inputs["pixel_values"]
    if pixel_values.dim() == 5:  # [B, max_views, 3, S, S] padded -> [sum views, 3, S, S]
        pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_views)], dim=0)
    pixel_values = pixel_values.to(inner.vision_tower.dtype)
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states  # depth+1 x [sum views, N, C]
    chosen = resolve_levels(levels, default_levels(cfg), len(hidden))
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    drop_cls = 1 if cfg.vision_feature_select_strategy == "default" else 0

    layer = cfg.vision_feature_layer
    if isinstance(layer, int):
        selected = hidden[layer]
    else:
        selected = torch.cat([hidden[i] for i in layer], dim=-1)
    projected = inner.multi_modal_projector(selected[:, drop_cls:])  # [sum views, N, D]
    starts = torch.tensor([0] + n_views[:-1]).cumsum(0).tolist()

    level_grids, v0, crop_grids = [], [], []
    for s, n in zip(starts, n_views):
        level_grids.append([hidden[lv][s, drop_cls:].reshape(side, side, -1)  # [S/p, S/p, C]
                            for lv in chosen])
        v0.append(projected[s].reshape(side, side, -1))  # [S/p, S/p, D]
        if crops:
            crop_grids.append([hidden[lv][s : s + n, drop_cls:].reshape(n, side, side, -1) for lv in chosen])

    # What the LLM receives per image (base, unpadded crops, newlines), packed by the model's own code.
    image_embeds, _ = inner.pack_image_features(
        torch.split(projected, n_views), inputs["image_sizes"], image_newline=inner.image_newline,
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    )
    image_embeds = list(image_embeds)
    n_tokens = [e.shape[0] for e in image_embeds]
    check_placeholders(inputs, model, n_tokens)
    extras: dict[str, Any] = {"n_views": n_views}
    if crops:
        extras["crop_level_grids"] = crop_grids
    return VisionFeatures(
        family=FAMILY, levels=chosen, level_grids=level_grids, v0=v0, image_embeds=image_embeds,
        num_image_tokens=n_tokens, v0_offset=[0] * len(n_tokens), extras=extras,
    )


def input_size(processor: Any) -> tuple[int, int]:
    """(width, height) of the base view."""
    ip = getattr(processor, "image_processor", processor)
    return int(ip.size["width"]), int(ip.size["height"])


def input_frame(processor: Any, original_size: tuple[int, int], multi_image: bool = False) -> Frame:
    """Original pixels -> the base view's pixels (the whole image squashed to the tower's square size).

    `multi_image=True`: images of a multi-image sample are first padded to a centred square (longest side),
    then resized; the frame includes that padding.
    """
    w, h = original_size
    iw, ih = input_size(processor)
    if not multi_image or w == h:
        return Frame.resize((w, h), (iw, ih))
    side = max(w, h)
    # pad_to_square pastes the image at ((side - w) // 2, (side - h) // 2); the square is then resized.
    sx, sy = Fraction(iw, side), Fraction(ih, side)
    pad_x, pad_y = (side - w) // 2, (side - h) // 2
    return Frame((w, h), (iw, ih), (sx, sy), (-pad_x * sx, -pad_y * sy))


def embeds_forward_kwargs(inputs: dict, inputs_embeds: torch.Tensor) -> dict:
    """Model kwargs for a forward on precomputed `inputs_embeds` (see `backbones.embed_inputs`).

    Positions are plain 1-D, so only the mask travels along; the vision tower is not run again.
    """
    return {k: inputs[k] for k in ("attention_mask",) if k in inputs} | {"inputs_embeds": inputs_embeds}


# ------------------------------------------------------------------------------------------------------------
# The family's anomaly classes (the mechanism: `injection`); their `model_type` strings are in checkpoints.
# ------------------------------------------------------------------------------------------------------------
class AnomalyLlavaOnevisionConfig(AnomalyConfigFields, LlavaOnevisionConfig):
    """LLaVA-OneVision's config with the expert's settings and the anomaly token ids."""

    model_type = "anomaly_llava_onevision"


class AnomalyLlavaOnevisionModel(AnomalyInnerMixin, LlavaOnevisionModel):
    """LLaVA-OneVision's inner model with the expert in its forward."""

    family = FAMILY


class AnomalyLlavaOnevisionForConditionalGeneration(
    AnomalyOuterMixin, LlavaOnevisionForConditionalGeneration
):
    """LLaVA-OneVision with the anomaly expert."""

    config_class = AnomalyLlavaOnevisionConfig
    family = FAMILY
    inner_class = AnomalyLlavaOnevisionModel
    forward = anomaly_forward(LlavaOnevisionForConditionalGeneration)


class AnomalyLlavaOnevisionProcessor(AnomalyBlockMixin, ImageOnlyLlavaOnevisionProcessor):
    """LLaVA-OneVision processor with the anomaly block after `<image>`."""

    placeholder = IMAGE_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, vision_aspect_ratio="anyres_max_9",
                 num_anomaly_tokens: int = 5, expert_image_size: int | None = None, **kwargs):
        self.num_anomaly_tokens = int(num_anomaly_tokens)
        self.expert_image_size = expert_image_size
        super().__init__(image_processor, tokenizer, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, vision_aspect_ratio=vision_aspect_ratio, **kwargs)


ANOMALY_CONFIG_CLASS = AnomalyLlavaOnevisionConfig
ANOMALY_MODEL_CLASS = AnomalyLlavaOnevisionForConditionalGeneration
ANOMALY_PROCESSOR_CLASS = AnomalyLlavaOnevisionProcessor
