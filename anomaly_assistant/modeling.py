"""Building anomaly models: a family's plain backbone (or config) + a new expert -> (model, processor).

The anomaly classes themselves live with their family (`backbones/<family>.py`), the mechanism they share in
`injection`. Importing this module loads every registered family, so `AutoModelForImageTextToText` /
`AutoProcessor.from_pretrained` find saved anomaly checkpoints (`model_type` "anomaly_<family>").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig

from . import backbones
from .backbones import ANOMALY_LEVEL, ANOMALY_PAD
from .expert import ExpertConfig
from .processing import anomaly_processor

for _family in backbones.FAMILIES:
    backbones.get(_family)


# ------------------------------------------------------------------------------------------------------------
# Building an anomaly model from a plain backbone.
# ------------------------------------------------------------------------------------------------------------
def default_expert_config(base_config: Any, family: str, feature_source: str = "backbone",
                          levels: Sequence[int] | None = None,
                          **overrides: Any) -> tuple[ExpertConfig, list[int]]:
    """Expert sizes that fit a backbone: level widths of its vision tower (or the CNN's), D = the LLM's."""
    module = backbones.get(family)
    chosen = list(levels if levels is not None else module.default_levels(base_config))
    text_hidden = int(base_config.text_config.hidden_size)
    source: dict = {}
    if feature_source == "backbone":
        vision = base_config.vision_config
        widths = getattr(vision, "hidden_sizes", None)  # per hidden state where they differ (a CNN tower)
        level_dims = [int(widths[lv] if widths else vision.hidden_size) for lv in chosen]
    elif feature_source == "efficientnet_lite0":
        from .expert.sources import EFFNET_LITE0_BLOCKS, EfficientNetLite0Config

        source = {
            "blocks": list(EfficientNetLite0Config.blocks), "image_size": EfficientNetLite0Config.image_size
        }
        level_dims = [EFFNET_LITE0_BLOCKS[b][1] for b in source["blocks"]]
    else:
        raise ValueError(f"unknown feature source {feature_source!r}")
    small = text_hidden < 256
    sizes = {"embed_dim": 32, "class_code_dim": 32, "lookback_grid": 8} if small else {}
    expert = ExpertConfig(feature_source=feature_source, source_options=source, level_dims=level_dims,
                          token_dim=text_hidden, **{**sizes, **overrides})
    return expert, chosen


def cnn_input_size(expert: ExpertConfig) -> int | None:
    """Side of the square CNN input the processor must emit (efficientnet source), else None."""
    if expert.feature_source != "efficientnet_lite0":
        return None
    return int(expert.source_options.get("image_size", 256))


def level_word_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Token ids of the first word of each level phrase (" slightly", " moderately", " highly")."""
    return [tokenizer(" " + w.split()[0], add_special_tokens=False)["input_ids"] for w in words]


def anomaly_config(base_config: Any, family: str, tokenizer: Any, expert: ExpertConfig,
                   levels: Sequence[int]) -> Any:
    """The anomaly config of `family` built from a plain backbone config."""
    data = base_config.to_dict()
    data.pop("model_type", None)
    data.pop("architectures", None)
    return backbones.get(family).ANOMALY_CONFIG_CLASS(
        **data,
        expert=expert.to_dict(),
        expert_levels=list(levels),
        anomaly_pad_token_id=tokenizer.convert_tokens_to_ids(ANOMALY_PAD),
        anomaly_level_token_id=tokenizer.convert_tokens_to_ids(ANOMALY_LEVEL),
        level_word_token_ids=level_word_ids(tokenizer, expert.level_words),
    )


def from_backbone(model: Any, processor: Any, feature_source: str = "backbone",
                  levels: Sequence[int] | None = None, **expert_overrides: Any) -> tuple[Any, Any]:
    """(anomaly model, anomaly processor) around an in-memory backbone: its weights copied, a new expert."""
    family = backbones.family_of(model.config)
    backbones.ensure_anomaly_tokens(model, processor.tokenizer)
    expert, chosen = default_expert_config(model.config, family, feature_source, levels, **expert_overrides)
    config = anomaly_config(model.config, family, processor.tokenizer, expert, chosen)
    anomaly = backbones.get(family).ANOMALY_MODEL_CLASS(config)
    missing, unexpected = anomaly.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("model.expert.") for k in missing):
        raise RuntimeError(f"backbone weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    anomaly.expert.reset_parameters()
    anomaly.generation_config = model.generation_config
    anomaly = anomaly.to(dtype=next(model.parameters()).dtype).eval()
    return anomaly, anomaly_processor(processor, family, expert.num_tokens, cnn_input_size(expert))


def from_config(base_config: Any, processor: Any, feature_source: str = "backbone",
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                levels: Sequence[int] | None = None, **expert_overrides: Any) -> tuple[Any, Any]:
    """(anomaly model, anomaly processor) with random weights for a plain backbone config: no checkpoint.

    For measuring speed and memory at real widths (e.g. Qwen2.5-VL-3B's) where no weights can be had; the
    weights are created directly on `device` in `dtype`. The tokenizer must already hold the anomaly markers
    and fit in the config's vocabulary.
    """
    family = backbones.family_of(base_config)
    tokenizer = processor.tokenizer
    if missing := backbones.missing_anomaly_tokens(tokenizer):
        raise ValueError(
            f"the tokenizer lacks the anomaly markers {missing} (backbones.add_anomaly_tokens adds them)"
        )
    if len(tokenizer) > int(base_config.text_config.vocab_size):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the config's vocabulary only "
                         f"{base_config.text_config.vocab_size}")
    expert, chosen = default_expert_config(base_config, family, feature_source, levels, **expert_overrides)
    config = anomaly_config(base_config, family, tokenizer, expert, chosen)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device):
            model = backbones.get(family).ANOMALY_MODEL_CLASS(config)
    finally:
        torch.set_default_dtype(previous)
    model.expert.reset_parameters()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), anomaly_processor(processor, family, expert.num_tokens, cnn_input_size(expert))


def tiny_anomaly_model(family: str = "qwen2_5_vl", feature_source: str = "backbone", seed: int = 0):
    """A tiny random anomaly model + processor of `family`, built in code (tests and the offline default)."""
    from .tiny import build_tiny

    model, processor = build_tiny(family, seed=seed)
    torch.manual_seed(seed)
    return from_backbone(model, processor, feature_source=feature_source)


def load_backbone_as_anomaly(path_or_id: str, feature_source: str = "backbone", **model_kwargs: Any):
    """A plain checkpoint of a registered family (hub id or directory) with a new, untrained expert."""
    base_config = AutoConfig.from_pretrained(path_or_id)
    family = backbones.family_of(base_config)
    model, processor = backbones.get(family).load(path_or_id, **model_kwargs)
    return from_backbone(model, processor, feature_source=feature_source)
