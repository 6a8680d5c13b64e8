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
    return _with_blocks(text, placeholder, num_tokens)[0]


def _with_blocks(text: str, placeholder: str, num_tokens: int) -> tuple[str, list[int]]:
    """(`insert_anomaly_blocks(text, ...)`, where each inserted block starts in that new text)."""
    block = anomaly_block(num_tokens)
    pattern = re.escape(placeholder) + "(?!" + re.escape(ANOMALY_START) + ")"
    pieces, starts, last = [], [], 0
    for m in re.finditer(pattern, text):
        pieces.append(text[last : m.end()])
        starts.append(m.end() + len(block) * len(starts))
        pieces.append(block)
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces), starts


def _offsets_through_blocks(replacements: list[dict], block_starts: list[int], block: str) -> list[dict]:
    """Expansion offsets the processor reports for the text with blocks -> offsets of the text as given.

    `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's assistant-only loss) finds the
    assistant's characters in the rendered template and shifts them past every placeholder the processor
    expanded before them, by these offsets. The blocks inserted here are such an expansion too: without
    them in the offsets every assistant mask would sit a block's length too early (on prompt tokens).
    """
    n = len(block)

    def to_given(x: int) -> int:  # a position of the text with blocks (outside them) -> the text as given
        return x - n * sum(1 for b in block_starts if b + n <= x)

    def to_final(x: int) -> int:  # a position of the text with blocks -> the expanded text
        return x + sum((r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
                       for r in replacements if r["span"][1] <= x)

    out = [dict(r, span=(to_given(r["span"][0]), to_given(r["span"][1]))) for r in replacements]
    for b in block_starts:
        at, start = to_given(b), to_final(b)
        out.append({"type": "anomaly_block", "span": (at, at), "new_span": (start, start + n), "text": "",
                    "replacement": block})
    return sorted(out, key=lambda r: (r["span"][1], r["new_span"][1]))


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
        block_starts = None
        if text is not None:
            single = isinstance(text, str)
            inserted = [_with_blocks(t, self.placeholder, self.num_anomaly_tokens)
                        for t in ([text] if single else list(text))]
            texts, block_starts = [t for t, _ in inserted], [s for _, s in inserted]
            text = texts[0] if single else texts
        out = super().__call__(images, text, *args, **kwargs)
        if block_starts is not None and out.get("text_replacement_offsets") is not None:
            block = anomaly_block(self.num_anomaly_tokens)
            out["text_replacement_offsets"] = [
                _offsets_through_blocks(list(r), starts, block)
                for r, starts in zip(out["text_replacement_offsets"], block_starts)
            ]
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
