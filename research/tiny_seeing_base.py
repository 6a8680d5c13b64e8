"""A tiny LLaVA that can see: the tiny random LLM behind the pretrained EfficientNet-Lite0 tower.

    python research/tiny_seeing_base.py runs/tiny-seeing-base [--image-size 128] [--patch-size 16]

The tiny test models' vision towers are random, so nothing the tiny pipeline trains can depend on the image
(its stage-1b expert stays near chance, `train/README.md`). This base keeps the tiny LLM and tokenizer
(`tiny.build_tokenizer("llava")`, `TINY_LLM`) but gives it the default model's pretrained vision tower, so the
tiny pipeline can be measured on a model whose expert and image tokens carry the defect: start a pipeline
from the saved folder (`model: runs/tiny-seeing-base`, see `research/pipeline_tiny_seeing.yaml`).
"""

from __future__ import annotations

import anomaly_assistant  # noqa: F401 - first: it sets torch's OpenMP spin count before torch loads

# isort: split

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to save the base model and processor in")
    parser.add_argument("--image-size", type=int, default=128, help="the tower's square input side")
    parser.add_argument("--patch-size", type=int, default=16, help="token grid stride in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from anomaly_assistant import backbones
    from anomaly_assistant.backbones.llava import CHAT_TEMPLATE, IMAGE_TOKEN
    from anomaly_assistant.efficientnet_tower import EfficientNetLiteVisionConfig
    from anomaly_assistant.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer("llava")
    text = tiny_config("llava", tokenizer).text_config.to_dict()  # the tiny LLM of the llava test models
    vision = EfficientNetLiteVisionConfig(image_size=args.image_size, patch_size=args.patch_size)
    config = LlavaConfig(text_config=text, vision_config=vision.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_pretrained_weights()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id, gen.do_sample = (
        tokenizer.eos_token_id, tokenizer.pad_token_id, None, False)
    image_processor = CLIPImageProcessorPil(
        size={"height": args.image_size, "width": args.image_size}, do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2)
    processor = backbones.get("llava").PROCESSOR_CLASS(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        patch_size=args.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    tokens = (args.image_size // args.patch_size) ** 2
    print(f"saved {out}: {n / 1e6:.1f} M parameters, {tokens} image tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
