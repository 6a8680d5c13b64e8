"""Processors that insert the anomaly block after every image, so token counts always match the expert's K.

Text goes in with the family's ordinary image placeholder (from its chat template); each placeholder gets
`<|anomaly_start|><|anomaly_level|><|anomaly_pad|>×K<|anomaly_end|>` appended before tokenisation, exactly
once (text that already carries the block is left alone, so applying the processor twice is harmless). With
the EfficientNet-Lite0 feature source the processor also emits `expert_pixel_values` (B, 3, S, S), the CNN's
input for each image in order, so the model never needs the original PIL images.

`AnomalyBlockMixin` is the mechanism; each family's anomaly processor class lives in `backbones/<family>.py`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import backbones
from .backbones import ANOMALY_END, ANOMALY_LEVEL, ANOMALY_PAD, ANOMALY_START

# EfficientNet-Lite normalisation ((x - 127) / 128): the constants of expert.sources.EfficientNetLite0Source.
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


def placeholder_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Special tokens a generated answer must never hold: all but end-of-sequence and padding.

    A generated image or anomaly placeholder (`<|image_pad|>`, `<|anomaly_pad|>`, ...) makes the next forward
    count more placeholders than it has images, which raises; an untrained or early-GRPO model emits anything.
    Generation (the assistant, GRPO sampling) passes these as `suppress_tokens`.
    """
    eos = model.generation_config.eos_token_id
    allowed = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(eos if isinstance(eos, list) else [eos])}
    return sorted(set(tokenizer.all_special_ids) - allowed)


class AnomalyBlockMixin:
    """What every family's anomaly processor adds to its processor: blocks in the text, the CNN's pixels.

    A family declares `placeholder` and takes `num_anomaly_tokens` / `expert_image_size` in its constructor.
    """

    placeholder: str = ""  # unexpanded image placeholder after which the block goes
    num_anomaly_tokens: int
    expert_image_size: int | None

    def __call__(self, images=None, text=None, *args, **kwargs):
        if text is not None:
            single = isinstance(text, str)
            texts = [text] if single else list(text)
            texts = [insert_anomaly_blocks(t, self.placeholder, self.num_anomaly_tokens) for t in texts]
            text = texts[0] if single else texts
        out = super().__call__(images, text, *args, **kwargs)
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


# Constructor arguments of an anomaly processor that `anomaly_processor` does not copy from the base one.
_OWN_ARGUMENTS = {
    "self", "image_processor", "tokenizer", "chat_template", "num_anomaly_tokens", "expert_image_size",
    "kwargs",
}


def anomaly_processor(base: Any, family: str, num_anomaly_tokens: int, expert_image_size: int | None = None):
    """Wrap a family's processor into its anomaly subclass (same image processor, tokenizer and template).

    Every other argument of the anomaly class's constructor (LLaVA's `patch_size`, LLaVA-OneVision's
    `num_image_tokens`, ...) is carried over from `base`: the same signature rule by which transformers saves
    and loads processor attributes.
    """
    cls = backbones.get(family).ANOMALY_PROCESSOR_CLASS
    carried = set(inspect.signature(cls.__init__).parameters) - _OWN_ARGUMENTS
    extra = {name: getattr(base, name) for name in sorted(carried) if getattr(base, name, None) is not None}
    return cls(
        image_processor=base.image_processor, tokenizer=base.tokenizer, chat_template=base.chat_template,
        num_anomaly_tokens=num_anomaly_tokens, expert_image_size=expert_image_size, **extra,
    )
