"""The model-input pixel frame a backbone writes boxes in, with or without a loaded processor.

Always delegates to the backbone module's own `input_frame(processor, original_size)`, so training targets use
exactly the resize rule the model sees. Without a processor, the real checkpoints' default image-processor
settings are used (Qwen2.5-VL-Instruct: smart resize to multiples of 28 within 3136..12845056 pixels;
LLaVA-OneVision: 384×384 base view; LLaVA-1.5: shortest edge 336 then centre crop 336).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from anomaly_assistant.finding import Frame

BACKBONES = ("qwen2_5_vl", "llava_onevision", "llava")


@cache
def default_image_processor(backbone: str) -> Any:
    """The PIL image processor with the real checkpoint's default resize settings (no download)."""
    if backbone == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2)
    if backbone == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessorPil

        return LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384})
    if backbone == "llava":
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")


def input_frame(backbone: str, original_size: tuple[int, int], processor: Any = None) -> Frame:
    """Original pixels -> `backbone`'s model-input pixels for an image of `original_size` (width, height)."""
    from anomaly_assistant import backbones

    module = backbones.get(backbone)
    return module.input_frame(
        processor if processor is not None else default_image_processor(backbone), tuple(original_size)
    )
