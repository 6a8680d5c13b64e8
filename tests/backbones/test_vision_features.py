"""Multi-level vision features: raster order, locality, mixed sizes, token bookkeeping, reuse of v°."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image
from transformers.vision_utils import get_vision_window_index

from anomaly_assistant import backbones
from anomaly_assistant.backbones import FAMILIES


def process(processor, images, prompt="Is there a defect?"):
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
    ] * len(images)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=text, images=images, return_tensors="pt", padding=True)


def features(tiny_backbones, family, images, levels=None):
    model, processor = tiny_backbones[family]
    inputs = process(processor, images)
    return inputs, backbones.get(family).vision_features(model, inputs, levels=levels)


def test_qwen_level0_is_patch_embedding_on_raster_grid(tiny_backbones):
    """Block-0 input, un-permuted, equals patch_embed applied to the image's patches read in raster order."""
    model, processor = tiny_backbones["qwen2_5_vl"]
    width, height = 224, 168  # already a multiple of 28: the processor does not resize
    image = noise_image(width, height, seed=7)
    inputs, feats = features(tiny_backbones, "qwen2_5_vl", [image], levels=[0, 1])
    thw = inputs["image_grid_thw"]
    assert thw.tolist() == [[1, height // 14, width // 14]]
    # the tiny config's windows really permute this grid (so this test would catch a missing un-permutation)
    vc = model.config.vision_config
    window_index, _ = get_vision_window_index(thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))

    ip = processor.image_processor
    arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, H, W]
    mean = np.array(ip.image_mean, np.float32)[:, None, None]
    std = np.array(ip.image_std, np.float32)[:, None, None]
    arr = (arr - mean) / std
    gh, gw = height // 14, width // 14
    patches = arr.reshape(3, gh, 14, gw, 14).transpose(1, 3, 0, 2, 4)  # [gh, gw, 3, 14, 14] raster
    # temporal copy: [gh*gw, 3*2*14*14]
    patches = np.repeat(patches[:, :, :, None], 2, axis=3).reshape(gh * gw, -1)
    with torch.no_grad():
        # [gh, gw, C]
        expected = model.model.visual.patch_embed(torch.from_numpy(patches)).reshape(gh, gw, -1)
    level0 = feats.level_grids[0][0]
    assert level0.shape == expected.shape
    torch.testing.assert_close(level0, expected, atol=1e-4, rtol=1e-4)


def _perturb(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    arr = np.asarray(image).copy()
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = 255 - arr[y1:y2, x1:x2]
    return Image.fromarray(arr)


# family -> (image side, perturbed pixel box, perturbed patch rows, cols); images keep their size in the
# processor
LOCALITY = {
    "qwen2_5_vl": (224, (112, 56, 140, 84), slice(4, 6), slice(8, 10)),
    "llava_onevision": (112, (70, 28, 84, 42), slice(2, 3), slice(5, 6)),
    "llava": (112, (70, 28, 84, 42), slice(2, 3), slice(5, 6)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_local_perturbation_moves_features_locally(tiny_backbones, family):
    """Changing a few patches of the image changes each level (and v°) most at those patches, in raster
    order."""
    model = tiny_backbones[family][0]
    side, box, rows, cols = LOCALITY[family]
    image = noise_image(side, side, seed=11)
    levels = (0, *backbones.get(family).default_levels(model.config))
    _, base = features(tiny_backbones, family, [image], levels=levels)
    _, moved = features(tiny_backbones, family, [_perturb(image, box)], levels=levels)

    def check(a: torch.Tensor, b: torch.Tensor, r: slice, c: slice, what: str) -> torch.Tensor:
        change = (a - b).norm(dim=-1)  # [H, W]
        inside = torch.zeros_like(change, dtype=torch.bool)
        inside[r, c] = True
        assert change[inside].min() > 0, what
        peak = divmod(int(change.argmax()), change.shape[1])
        assert inside[peak], f"{what}: largest change at {peak}, not in rows {r} cols {c}"
        assert change[inside].mean() > 5 * change[~inside].mean(), what
        return change

    for j, level in enumerate(levels):
        change = check(base.level_grids[0][j], moved.level_grids[0][j], rows, cols, f"level {level}")
        if level == 0:  # the patch embedding is strictly per patch
            inside = torch.zeros_like(change, dtype=torch.bool)
            inside[rows, cols] = True
            assert change[~inside].max() == 0
        if family == "qwen2_5_vl" and level == 1:  # block 0 attends within 4x4-patch windows only
            window = torch.zeros_like(change, dtype=torch.bool)
            window[4:8, 8:12] = True
            assert change[~window].max() == 0 and change[window].max() > 0
    merge = 2 if family == "qwen2_5_vl" else 1
    v_rows = slice(rows.start // merge, (rows.stop + merge - 1) // merge)
    v_cols = slice(cols.start // merge, (cols.stop + merge - 1) // merge)
    check(base.v0[0], moved.v0[0], v_rows, v_cols, "v0")


# mixed sizes: (width, height); LLaVA-OV's pick different anyres crop grids, Qwen's different token grids
MIXED = [(150, 200), (300, 97), (224, 224)]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_sizes_batch_matches_single_images(tiny_backbones, family):
    model, _processor = tiny_backbones[family]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(MIXED)]
    inputs, feats = features(tiny_backbones, family, images)
    assert len(feats) == 3 and len(feats.levels) == 4
    image_id = backbones.image_token_id(model)
    runs = backbones.count_placeholders(inputs["input_ids"], image_id)
    assert runs == feats.num_image_tokens
    assert sum(runs) == int((inputs["input_ids"] == image_id).sum())
    for i, image in enumerate(images):
        _, single = features(tiny_backbones, family, [image])
        assert single.num_image_tokens[0] == feats.num_image_tokens[i]
        for a, b in zip(feats.level_grids[i], single.level_grids[0]):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats.v0[i], single.v0[0], atol=1e-5, rtol=1e-4)
        # v° is where the bookkeeping says it is inside the image's token run
        h, w, d = feats.v0[i].shape
        assert d == model.config.text_config.hidden_size
        sl = feats.v0_slices[i]
        torch.testing.assert_close(feats.image_embeds[i][sl], feats.v0[i].reshape(h * w, d))
        grid_h, grid_w = feats.level_grids[i][0].shape[:2]
        merge = 2 if family == "qwen2_5_vl" else 1
        assert (grid_h, grid_w) == (h * merge, w * merge)
    if family == "qwen2_5_vl":  # token grid follows each image's smart-resized size
        expected = [tuple(t) for t in (inputs["image_grid_thw"][:, 1:] // 2).tolist()]
        assert [tuple(v.shape[:2]) for v in feats.v0] == expected
        assert len({v.shape[:2] for v in feats.v0}) == 3
    if family == "llava_onevision":  # anyres: more tokens than the base view, v° first
        assert all(n > h * w for n in feats.num_image_tokens)
        assert len(set(feats.extras["n_views"])) > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_image_embeds_are_what_the_llm_sees(tiny_backbones, family):
    """Scattering `image_embeds` into the text embeddings reproduces the model's own forward exactly."""
    model, _processor = tiny_backbones[family]
    module = backbones.get(family)
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(MIXED[:2])]
    inputs, feats = features(tiny_backbones, family, images)
    with torch.no_grad():
        reference = model(**inputs).logits
        embeds = backbones.embed_inputs(model, inputs["input_ids"], feats.image_embeds)
        again = model(**module.embeds_forward_kwargs(inputs, embeds)).logits
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-4)
    assert backbones.text_embeddings(model) is model.get_input_embeddings()


def test_levels_argument(tiny_backbones):
    model = tiny_backbones["llava"][0]
    image = noise_image(112, 112, seed=1)
    _, feats = features(tiny_backbones, "llava", [image], levels=[-1, 2])
    depth = model.config.vision_config.num_hidden_layers
    assert feats.levels == (depth, 2)
    with pytest.raises(ValueError):
        features(tiny_backbones, "llava", [image], levels=[depth + 1])


def test_default_levels_of_real_configs():
    from transformers import CLIPVisionConfig, Qwen2_5_VLVisionConfig, SiglipVisionConfig

    from anomaly_assistant.backbones import llava, llava_onevision, qwen2_5_vl

    assert qwen2_5_vl.default_levels(Qwen2_5_VLVisionConfig()) == (8, 16, 24, 32)  # blocks 7, 15, 23, 31
    assert llava_onevision.default_levels(SiglipVisionConfig(num_hidden_layers=26)) == (7, 13, 19, 25)
    assert llava.default_levels(CLIPVisionConfig(num_hidden_layers=24)) == (6, 12, 18, 24)
    assert llava.default_levels(CLIPVisionConfig(num_hidden_layers=4)) == (1, 2, 3, 4)


def test_qwen_last_level_merges_into_v0(tiny_backbones):
    """The last level, re-blocked 2x2 and put through the merger, is v°: levels and v° share one raster
    grid."""
    model = tiny_backbones["qwen2_5_vl"][0]
    depth = model.config.vision_config.depth
    image = noise_image(150, 200, seed=5)
    _, feats = features(tiny_backbones, "qwen2_5_vl", [image], levels=[depth])
    grid = feats.level_grids[0][0]  # [H, W, C]
    h, w, c = grid.shape
    blocks = grid.reshape(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(-1, c)  # merge-unit order
    with torch.no_grad():
        merged = model.model.visual.merger(blocks).reshape(h // 2, w // 2, -1)
    torch.testing.assert_close(merged, feats.v0[0], atol=1e-5, rtol=1e-4)


def test_llava_onevision_crops(tiny_backbones):
    """`crops=True` exposes every view's levels; view 0 is the base view used for the levels and v°."""
    model, processor = tiny_backbones["llava_onevision"]
    image = noise_image(224, 112, seed=2)  # best anyres grid 112x224: base + 2 crops
    inputs = process(processor, [image])
    feats = backbones.get("llava_onevision").vision_features(model, inputs, crops=True)
    assert feats.extras["n_views"] == [3]
    crops = feats.extras["crop_level_grids"][0]
    assert [g.shape[0] for g in crops] == [3] * len(feats.levels)
    for base, views in zip(feats.level_grids[0], crops):
        torch.testing.assert_close(views[0], base)
    # base 8x8 + unpadded 8x16 crop grid with one newline per row
    assert feats.num_image_tokens == [64 + 8 * 16 + 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_v0_carries_gradients_to_the_projector(tiny_backbones, family):
    """Outside no_grad, v° stays differentiable, so a trained projector/merger learns through expert
    tokens."""
    model, processor = tiny_backbones[family]
    inputs = process(processor, [noise_image(112, 112, seed=4)])
    feats = backbones.get(family).vision_features(model, inputs)
    feats.v0[0].sum().backward()
    projector = model.model.visual.merger if family == "qwen2_5_vl" else model.model.multi_modal_projector
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_with_the_wrong_number_of_image_placeholders_is_refused(tiny_backbones, family):
    """A prompt whose image-placeholder run is one token short cannot be paired with the tower's tokens."""
    model, processor = tiny_backbones[family]
    inputs = process(processor, [noise_image(96, 80, seed=3)])
    ids = inputs["input_ids"].clone()
    image_id = backbones.image_token_id(model)
    first = int((ids[0] == image_id).nonzero()[0])
    ids[0, first] = processor.tokenizer.pad_token_id  # the run is now one shorter (and starts later)
    with pytest.raises(ValueError, match="placeholder runs"):
        backbones.get(family).vision_features(model, {**inputs, "input_ids": ids})
