"""Qwen2.5-VL: chat template, image-only processor, raster-order features, input frame, tiny config.

Also the real checkpoints' resize rule (`MIN_PIXELS`, `MAX_PIXELS`) and the family's anomaly classes.

The vision tower sees 14-px patches (grouped 2x2 into merge units) and permutes merge units into attention
windows before the first block; its per-block hidden states therefore come out in window order, while the
merger output (`pooler_output`, the tokens the LLM sees) is already un-permuted. `vision_features` undoes the
window permutation for the intermediate levels: argsort(window_index) over merge units (the index is global
over the batch, so un-permute first, then split per image), then un-block each 2x2 merge unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.vision_utils import get_vision_window_index

from ..finding import Frame
from ..injection import AnomalyConfigFields, AnomalyInnerMixin, AnomalyOuterMixin, anomaly_forward
from ..processing import AnomalyBlockMixin
from . import (
    VisionFeatures,
    check_placeholders,
    load_pretrained,
    resolve_levels,
    spread_levels,
)

FAMILY = "qwen2_5_vl"
CONFIG_CLASS = Qwen2_5_VLConfig
MODEL_CLASS = Qwen2_5_VLForConditionalGeneration
IMAGE_TOKEN = "<|image_pad|>"
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
# The real checkpoints' resize rule (Qwen/Qwen2.5-VL-*-Instruct preprocessor_config.json): smart resize to
# multiples of 28 px within these pixel counts. The one home of these values: processors, frames and training
# targets all read them here.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # 3136 .. 12845056
PATCH_SIZE, MERGE_SIZE = 14, 2
# Tiny processor: at most 224x224 pixels (8x8 = 64 visual tokens), at least 56x56.
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 56 * 56, 224 * 224
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's own template (as shipped by Qwen/Qwen2.5-VL-*-Instruct) with {% generation %} markers around
# the assistant turn, including its closing <|im_end|>: the same text as TRL's qwen2_5_vl_training.jinja, so a
# real checkpoint renders byte-identically with or without it.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation -%}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endgeneration -%}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video slot, so it builds and loads without torchvision.

    ProcessorMixin derives its sub-processors from this `__init__` signature: leaving `video_processor` out
    makes it neither required nor type-checked (the check needs a class only exported with torchvision).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


PROCESSOR_CLASS = ImageOnlyQwen2_5_VLProcessor


def build_image_processor(
    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> Qwen2VLImageProcessorPil:
    """The PIL image processor; by default with the real checkpoints' resize rule (min/max pixels)."""
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE
    )


def build_processor(
    tokenizer: Any, chat_template: str | None = CHAT_TEMPLATE, min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> ImageOnlyQwen2_5_VLProcessor:
    """The image-only processor; by default it resizes like the real checkpoints."""
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=build_image_processor(min_pixels, max_pixels), tokenizer=tokenizer,
        chat_template=chat_template,
    )


def build_tiny_processor(tokenizer: Any) -> ImageOnlyQwen2_5_VLProcessor:
    """The tiny models' processor: the real rule with a 224x224 pixel budget."""
    return build_processor(tokenizer, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


# (model, processor) from a hub id or local directory; see `backbones.load_pretrained`. The processor loads
# through the image-only class (AutoProcessor would need torchvision for a real checkpoint's processor
# files).
load = partial(load_pretrained, MODEL_CLASS, PROCESSOR_CLASS)


def tiny_config(tokenizer: Any, text: dict) -> Qwen2_5_VLConfig:
    """The tiny test config: `text` holds the tiny LLM's sizes; 4 vision blocks, 2 of them full attention."""
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config={
            "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": 2,
            "out_hidden_size": text["hidden_size"],
            # 56-px windows = 2x2 merge units: a 224-px image has 16 windows, so the permutation is real.
            "window_size": 56, "fullatt_block_indexes": [1, 3],
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def default_levels(config: Any) -> tuple[int, ...]:
    """Hidden-state indices of the full-attention blocks' outputs (real: blocks 7,15,23,31 -> 8,16,24,32).

    A tower with fewer than four full-attention blocks (tiny configs) uses four levels spread over its depth.
    """
    vc = getattr(config, "vision_config", config)
    full = tuple(int(i) + 1 for i in vc.fullatt_block_indexes)
    return full if len(full) >= 4 else spread_levels(int(vc.depth))


def _unpermute(hidden: torch.Tensor, reverse: torch.Tensor, unit: int) -> torch.Tensor:
    """Window order -> merge-block order: (N, C) -> (N, C), merge units reordered by argsort(window_index)."""
    n, c = hidden.shape
    return hidden.reshape(n // unit, unit, c)[reverse].reshape(n, c)  # [N, C]


def _unblock(hidden: torch.Tensor, t: int, h: int, w: int, merge: int) -> torch.Tensor:
    """Merge-block order (t, h/m, w/m, m, m) -> raster (h, w, C) grid of the first frame."""
    c = hidden.shape[-1]
    x = hidden.reshape(t, h // merge, w // merge, merge, merge, c)  # [t, h/m, w/m, m, m, C]
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(t, h, w, c)  # [t, h, w, C]
    return x[0]


def vision_features(model: Any, inputs: dict, levels: Sequence[int] | None = None) -> VisionFeatures:
    """Multi-level patch features (raster (H, W, C) on the 14-px patch grid) and v° (merger output (h, w, D)).

    v° is the whole image-token run (offset 0): Qwen2.5-VL gives the LLM exactly the merged tokens, in raster
    order.
    """
    visual = model.model.visual
    cfg = visual.config
    pixel_values = inputs["pixel_values"].to(visual.dtype)  # [N_patches, 3*t*p*p]
    grid_thw = inputs["image_grid_thw"]  # [n_images, 3]
    out = visual(pixel_values, grid_thw=grid_thw, output_hidden_states=True)
    hidden = out.hidden_states  # depth+1 x [N_patches, C], window order
    chosen = resolve_levels(levels, default_levels(cfg), len(hidden))

    merge = cfg.spatial_merge_size
    unit = merge * merge
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=cfg.window_size, patch_size=cfg.patch_size
    )
    reverse = torch.argsort(window_index.to(pixel_values.device))  # over merge units of the whole batch
    sizes = grid_thw.prod(-1).tolist()  # patches per image
    per_level = [torch.split(_unpermute(hidden[lv], reverse, unit), sizes) for lv in chosen]

    thw = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    level_grids = [[_unblock(per_level[j][i], *thw[i], merge) for j in range(len(chosen))]
                   for i in range(len(thw))]
    image_embeds = list(torch.split(out.pooler_output, [s // unit for s in sizes]))  # [N_i, D] raster
    v0 = [e.reshape(h // merge, w // merge, -1) for e, (_, h, w) in zip(image_embeds, thw)]  # [h, w, D]
    n_tokens = [e.shape[0] for e in image_embeds]
    check_placeholders(inputs, model, n_tokens)
    return VisionFeatures(
        family=FAMILY, levels=chosen, level_grids=level_grids, v0=v0, image_embeds=image_embeds,
        num_image_tokens=n_tokens, v0_offset=[0] * len(n_tokens),
        extras={"grid_thw": grid_thw, "patch_size": cfg.patch_size, "merge_size": merge},
    )


def input_size(processor: Any, original_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the smart-resized image the model sees, by the processor's own rule."""
    ip = getattr(processor, "image_processor", processor)
    w, h = original_size
    factor = ip.patch_size * ip.merge_size
    rh, rw = smart_resize(
        h, w, factor=factor, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
    )
    return rw, rh


def input_frame(processor: Any, original_size: tuple[int, int]) -> Frame:
    """Original pixels -> absolute pixels of the smart-resized input (where Qwen2.5-VL writes boxes)."""
    return Frame.resize(tuple(original_size), input_size(processor, original_size))


def embeds_forward_kwargs(inputs: dict, inputs_embeds: torch.Tensor) -> dict:
    """Model kwargs for a forward on precomputed `inputs_embeds` (see `backbones.embed_inputs`).

    Qwen2.5-VL still needs `input_ids`, `image_grid_thw` and `mm_token_type_ids` for its 3-D (mrope)
    positions; with `pixel_values` left out the vision tower is not run again.
    """
    keep = ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")
    return {k: inputs[k] for k in keep if k in inputs} | {"inputs_embeds": inputs_embeds}


# ------------------------------------------------------------------------------------------------------------
# The family's anomaly classes (the mechanism: `injection`); their `model_type` strings are in checkpoints.
# ------------------------------------------------------------------------------------------------------------
class AnomalyQwen2_5_VLConfig(AnomalyConfigFields, Qwen2_5_VLConfig):
    """Qwen2.5-VL's config with the expert's settings and the anomaly token ids."""

    model_type = "anomaly_qwen2_5_vl"


class AnomalyQwen2_5_VLModel(AnomalyInnerMixin, Qwen2_5_VLModel):
    """Qwen2.5-VL's inner model with the expert in its forward."""

    family = FAMILY


class AnomalyQwen2_5_VLForConditionalGeneration(AnomalyOuterMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with the anomaly expert."""

    config_class = AnomalyQwen2_5_VLConfig
    family = FAMILY
    inner_class = AnomalyQwen2_5_VLModel
    forward = anomaly_forward(Qwen2_5_VLForConditionalGeneration)


class AnomalyQwen2_5_VLProcessor(AnomalyBlockMixin, ImageOnlyQwen2_5_VLProcessor):
    """Qwen2.5-VL processor with the anomaly block after `<|vision_end|>`."""

    placeholder = "<|image_pad|><|vision_end|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_anomaly_tokens: int = 5,
                 expert_image_size: int | None = None, **kwargs):
        self.num_anomaly_tokens = int(num_anomaly_tokens)
        self.expert_image_size = expert_image_size
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


ANOMALY_CONFIG_CLASS = AnomalyQwen2_5_VLConfig
ANOMALY_MODEL_CLASS = AnomalyQwen2_5_VLForConditionalGeneration
ANOMALY_PROCESSOR_CLASS = AnomalyQwen2_5_VLProcessor
