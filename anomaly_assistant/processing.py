"""Processors that insert the anomaly block after every image, so token counts always match the expert's K.

Text goes in with the family's ordinary image placeholder (from its chat template); each placeholder gets
`<|anomaly_start|><|anomaly_level|><|anomaly_pad|>×K<|anomaly_end|>` appended before tokenisation, exactly once
(text that already carries the block is left alone, so applying the processor twice is harmless). With the
EfficientNet-Lite0 feature source the processor also emits `expert_pixel_values` (B, 3, S, S), the CNN's input
for each image in order, so the model never needs the original PIL images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaProcessor

from .backbones import ANOMALY_END, ANOMALY_LEVEL, ANOMALY_PAD, ANOMALY_START
from .backbones.llava_onevision import ImageOnlyLlavaOnevisionProcessor
from .backbones.qwen2_5_vl import ImageOnlyQwen2_5_VLProcessor

# EfficientNet-Lite normalisation ((x - 127) / 128): the same constants as expert.sources.EfficientNetLite0Source.
_CNN_MEAN, _CNN_STD = 0.5, 0.5


def anomaly_block(num_tokens: int) -> str:
    """The text of one anomaly block with K pad tokens."""
    if num_tokens < 1:
        raise ValueError("an anomaly block needs at least one token")
    return f"{ANOMALY_START}{ANOMALY_LEVEL}{ANOMALY_PAD * num_tokens}{ANOMALY_END}"


def insert_anomaly_blocks(text: str, placeholder: str, num_tokens: int) -> str:
    """Append the block after each `placeholder` not already followed by one."""
    pattern = re.escape(placeholder) + "(?!" + re.escape(ANOMALY_START) + ")"
    return re.sub(pattern, lambda m: m.group(0) + anomaly_block(num_tokens), text)


def _flatten_images(images: Any) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    out: list[Image.Image] = []
    if isinstance(images, Iterable) and not isinstance(images, (str, bytes, np.ndarray, torch.Tensor)):
        for item in images:
            out.extend(_flatten_images(item))
        return out
    raise TypeError("expert_pixel_values needs PIL images")


def cnn_pixel_values(images: list[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) EfficientNet-Lite input: squashed to a square, (x - 0.5) / 0.5 on [0, 1] pixels."""
    batch = []
    for im in images:
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        batch.append(torch.from_numpy(arr).permute(2, 0, 1))  # [3, S, S]
    return (torch.stack(batch) - _CNN_MEAN) / _CNN_STD


class _AnomalyBlockMixin:
    """Shared `__call__`: insert blocks into the text, then the family's own processing."""

    placeholder: str = ""  # unexpanded image placeholder after which the block goes
    num_anomaly_tokens: int
    expert_image_size: int | None

    def __call__(self, images=None, text=None, *args, **kwargs):
        if text is not None:
            single = isinstance(text, str)
            texts = [text] if single else list(text)
            texts = [insert_anomaly_blocks(t, self.placeholder, self.num_anomaly_tokens) for t in texts]
            text = texts[0] if single else texts
        out = super().__call__(images=images, text=text, *args, **kwargs)
        if images is not None and self.expert_image_size:
            flat = _flatten_images(images)
            if flat:
                pv = cnn_pixel_values(flat, int(self.expert_image_size))
                out["expert_pixel_values"] = pv if kwargs.get("return_tensors") == "pt" else pv.numpy()
        return out

    @property
    def model_input_names(self) -> list[str]:
        names = list(super().model_input_names)
        return names + (["expert_pixel_values"] if self.expert_image_size else [])


class AnomalyQwen2_5_VLProcessor(_AnomalyBlockMixin, ImageOnlyQwen2_5_VLProcessor):
    """Qwen2.5-VL processor with the anomaly block after `<|vision_end|>`."""

    placeholder = "<|image_pad|><|vision_end|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_anomaly_tokens: int = 5,
                 expert_image_size: int | None = None, **kwargs):
        self.num_anomaly_tokens = int(num_anomaly_tokens)
        self.expert_image_size = expert_image_size
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class AnomalyLlavaOnevisionProcessor(_AnomalyBlockMixin, ImageOnlyLlavaOnevisionProcessor):
    """LLaVA-OneVision processor with the anomaly block after `<image>`."""

    placeholder = "<image>"

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, vision_aspect_ratio="anyres_max_9",
                 num_anomaly_tokens: int = 5, expert_image_size: int | None = None, **kwargs):
        self.num_anomaly_tokens = int(num_anomaly_tokens)
        self.expert_image_size = expert_image_size
        super().__init__(image_processor, tokenizer, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


class AnomalyLlavaProcessor(_AnomalyBlockMixin, LlavaProcessor):
    """LLaVA-1.5 processor with the anomaly block after `<image>`."""

    placeholder = "<image>"

    def __init__(self, image_processor=None, tokenizer=None, patch_size=None, vision_feature_select_strategy=None,
                 chat_template=None, num_additional_image_tokens=0, num_anomaly_tokens: int = 5,
                 expert_image_size: int | None = None, **kwargs):
        self.num_anomaly_tokens = int(num_anomaly_tokens)
        self.expert_image_size = expert_image_size
        super().__init__(image_processor, tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         num_additional_image_tokens=num_additional_image_tokens, **kwargs)


PROCESSOR_CLASSES = {
    "qwen2_5_vl": AnomalyQwen2_5_VLProcessor,
    "llava_onevision": AnomalyLlavaOnevisionProcessor,
    "llava": AnomalyLlavaProcessor,
}


# Processor attributes (beyond image processor, tokenizer and template) that each family carries over.
_CARRIED: dict[str, tuple[str, ...]] = {
    "qwen2_5_vl": (),
    "llava_onevision": ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"),
    "llava": ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"),
}


def anomaly_processor(base: Any, family: str, num_anomaly_tokens: int, expert_image_size: int | None = None):
    """Wrap a family's processor (same image processor, tokenizer and template) into its anomaly subclass."""
    extra = {name: getattr(base, name) for name in _CARRIED[family] if getattr(base, name, None) is not None}
    return PROCESSOR_CLASSES[family](
        image_processor=base.image_processor, tokenizer=base.tokenizer, chat_template=base.chat_template,
        num_anomaly_tokens=num_anomaly_tokens, expert_image_size=expert_image_size, **extra,
    )


def register(config_classes: dict[str, type]) -> None:
    """Register each anomaly processor for its anomaly config class (called by `modeling`)."""
    for family, config_cls in config_classes.items():
        AutoProcessor.register(config_cls, PROCESSOR_CLASSES[family], exist_ok=True)
