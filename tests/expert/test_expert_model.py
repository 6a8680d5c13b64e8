"""Anomaly expert: K bookkeeping, tokens in v° space, map provenance, reference fusion, persistence, stage-1
losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly_assistant.expert import (
    LEVEL_WORDS,
    AnomalyExpert,
    ExpertConfig,
    ReferenceMatch,
    balanced_bce,
    level_word,
    resize_mask,
    stage1_loss,
)
from anomaly_assistant.expert.selector import VTSelector, weighted_pool


def _expert(seed: int = 0, **overrides) -> AnomalyExpert:
    torch.manual_seed(seed)
    return AnomalyExpert(ExpertConfig.tiny(**overrides)).eval()


def _inputs(level_shapes, v0_shape, dims=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(*hw, c, generator=g) for hw, c in zip(level_shapes, dims)]
    return levels, torch.randn(*v0_shape, generator=g)


# ------------------------------------------------------------------------------------------------------------
# Toy "backbone": a fixed random conv net over grey images with a planted bright square (the defect).
# ------------------------------------------------------------------------------------------------------------
class ToyBackbone(torch.nn.Module):
    """Two conv levels (stride 2 and 4) and v° = a linear map of the 8-px pooled second level (token grid)."""

    def __init__(self, token_dim: int = 32):
        super().__init__()
        torch.manual_seed(123)
        self.c1 = torch.nn.Conv2d(1, 16, 3, 2, 1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, 2, 1)
        self.proj = torch.nn.Linear(16, token_dim)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor):
        l1 = torch.relu(self.c1(images))  # [B, 16, H/2, W/2]
        l2 = torch.relu(self.c2(l1))  # [B, 16, H/4, W/4]
        v0 = self.proj(F.avg_pool2d(l2, 2).permute(0, 2, 3, 1))  # [B, H/8, W/8, D]
        levels = [[l1[i].permute(1, 2, 0), l2[i].permute(1, 2, 0)] for i in range(len(images))]
        return levels, list(v0)


def planted(n: int, seed: int, size: int = 32, patch: int = 8):
    """Grey noise images; every even one has a bright patch x patch square at a random place (mask given)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g) * 0.3
    masks, labels = [], []
    for i in range(n):
        m = torch.zeros(size, size)
        if i % 2 == 0:
            y, x = torch.randint(0, size - patch, (2,), generator=g).tolist()
            images[i, 0, y : y + patch, x : x + patch] += 0.7
            m[y : y + patch, x : x + patch] = 1
        masks.append(m)
        labels.append(float(i % 2 == 0))
    return images, masks, labels


@pytest.fixture(scope="module")
def toy_backbone():
    return ToyBackbone()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------
# Shapes and K bookkeeping
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "g, level_shapes, v0_shape, dims, llm_dim",
    [
        (2, [(8, 8), (4, 4)], (4, 4, 32), (16, 16), None),  # levels finer than v° (Qwen-like 2x patch grid)
        (1, [(6, 10)], (3, 5, 32), (24,), 48),  # one level, non-square, wider LLM
        (
            3,
            [(5, 7), (10, 14), (3, 3)],
            (5, 7, 32),
            (8, 16, 12),
            20,
        ),  # levels coarser and finer, narrower LLM
        (2, [(2, 2), (2, 2)], (1, 1, 32), (16, 16), None),  # a 1x1 token grid smaller than g
    ],
)
def test_shapes_and_token_count(g, level_shapes, v0_shape, dims, llm_dim):
    expert = _expert(query_grid=g, level_dims=list(dims), llm_dim=llm_dim).mark_trained()
    levels, v0 = _inputs(level_shapes, v0_shape, dims)
    with torch.no_grad():
        out = expert(levels, v0)
    K = 1 + g * g
    h, w = v0_shape[:2]
    assert expert.num_tokens == K == expert.config.num_tokens
    assert out.tokens.shape == (K, 32)
    assert out.projected_tokens.shape == (K, llm_dim or 32)
    assert out.level_maps.shape == (len(dims), h, w)
    assert out.anomaly_map.shape == (h, w) and out.ltfm_map.shape == (h, w)
    assert 0 <= float(out.anomaly_map.detach().min()) and float(out.anomaly_map.detach().max()) <= 1
    assert out.score.shape == () and 0 <= float(out.score) <= 1
    assert torch.allclose(out.anomaly_map, out.level_maps.mean(0))
    assert torch.allclose(out.significance, out.anomaly_map.mean())


def test_batch_of_mixed_sizes_matches_single_images():
    expert = _expert().mark_trained()
    items = [
        _inputs([(8, 8), (4, 4)], (4, 4, 32), seed=1),
        _inputs([(12, 6), (6, 3)], (6, 3, 32), seed=2),
        _inputs([(8, 8), (4, 4)], (4, 4, 32), seed=3),
    ]
    batch = expert.forward_batch([lv for lv, _ in items], [v for _, v in items])
    for (lv, v), b in zip(items, batch):
        one = expert(lv, v)
        assert b.tokens.shape == one.tokens.shape
        torch.testing.assert_close(b.tokens, one.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.anomaly_map, one.anomaly_map, rtol=1e-5, atol=1e-6)


def test_wrong_channels_or_level_count_raise():
    expert = _expert()
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    with pytest.raises(ValueError, match="levels"):
        expert(levels[:1], v0)
    with pytest.raises(ValueError, match="channels"):
        expert([levels[0], torch.randn(4, 4, 7)], v0)
    with pytest.raises(ValueError, match="v°"):
        expert(levels, torch.randn(4, 4, 31))


def test_ltfm_is_anomaly_ov_algebra():
    """With input_norm off, the map is exactly
    softmax(100 · normalize(Aᵢ vᵢ) · normalize(Gᵢ[e±; c]))[abnormal]."""
    expert = _expert(input_norm=False, lookback_grid=4).mark_trained()
    levels, v0 = _inputs([(4, 4), (4, 4)], (4, 4, 32))
    out = expert(levels, v0)
    lt = expert.ltfm
    tokens = v0.reshape(16, 32)  # a 4x4 grid pooled to lookback_grid 4 is itself
    c = lt.lookback.mlp(lt.lookback.token_mix.weight @ tokens + lt.lookback.token_mix.bias)[0]  # [Cc]
    maps = []
    for i, lv in enumerate(levels):
        d = F.normalize(lt.generators[i](torch.cat([lt.descriptors, c.expand(2, -1)], -1)), dim=-1)  # [2, E]
        u = F.normalize(lt.adapters[i](lv), dim=-1)  # [4, 4, E]
        maps.append((100.0 * u @ d.T).softmax(-1)[..., 1])
    torch.testing.assert_close(out.level_maps, torch.stack(maps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.anomaly_map, torch.stack(maps).mean(0), rtol=1e-5, atol=1e-6)


def test_the_ltfm_gives_each_level_its_own_cosine_logits_stacked_or_one_by_one():
    """Both paths (a ViT's equally shaped levels in one stacked pass, a CNN's one by one) equal Eq. 1 per
    level: logit_scale * cos(Aᵢ(norm(level)), Gᵢ([d, class code])), with each level's own weights."""
    expert = _expert(input_norm=True).mark_trained()
    g = torch.Generator().manual_seed(3)
    lt = expert.ltfm
    for shapes in ([(6, 6), (6, 6)], [(6, 6), (3, 3)]):  # stacked, then one by one
        levels = [torch.randn(2, h, w, 16, generator=g) for h, w in shapes]
        v0 = torch.randn(2, 3, 3, 32, generator=g)
        out = lt(levels, v0)
        expected = []
        for i, level in enumerate(levels):
            x = F.layer_norm(level, level.shape[-1:])
            u = F.normalize(lt.adapters[i](x), dim=-1)
            code = torch.cat([lt.descriptors[None].expand(2, -1, -1),
                              out.class_code[:, None].expand(-1, 2, -1)], dim=-1)
            d = F.normalize(lt.generators[i](code), dim=-1)
            prob = (lt.config.logit_scale * torch.einsum("bhwe,bke->bhwk", u, d)).softmax(-1)[..., 1]
            expected.append(F.adaptive_avg_pool2d(prob[:, None], (3, 3))[:, 0])
        expected = torch.stack(expected, dim=1)
        torch.testing.assert_close(out.level_maps, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected[:, 0], expected[:, 1])  # each level used its own weights


def test_reset_parameters_restores_identity_projector_after_a_generic_init():
    expert = _expert().mark_trained()
    for mod in expert.modules():  # what a host model's generic init does to every Linear
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=0.02)
    expert.reset_parameters()
    assert torch.equal(expert.projector.linear.weight, torch.eye(32)) and not expert.is_trained
    assert float(expert.ltfm.adapters[0].weight.detach().std()) > 0.05  # back to the default Linear init


# ------------------------------------------------------------------------------------------------------------
# Tokens live in v° space
# ------------------------------------------------------------------------------------------------------------
def test_uniform_map_gives_plain_average_pooling():
    v0 = torch.randn(2, 6, 9, 32)
    m = torch.full((2, 6, 9), 0.37)
    q, pooled = weighted_pool(v0, m, 3)
    plain = F.adaptive_avg_pool2d(v0.permute(0, 3, 1, 2), 3).flatten(2).transpose(1, 2)  # [B, 9, D]
    torch.testing.assert_close(q, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, torch.full((2, 9), 0.37))


def test_weighted_pool_follows_the_map():
    """A map that is 1 on one token and 0 elsewhere in a cell makes that cell's query exactly that token."""
    v0 = torch.randn(1, 4, 4, 32)
    m = torch.zeros(1, 4, 4)
    m[0, 1, 0] = 1.0  # inside the top-left 2x2 cell
    q, _ = weighted_pool(v0, m, 2)
    torch.testing.assert_close(q[0, 0], v0[0, 1, 0], rtol=1e-4, atol=1e-4)


def test_weighted_means_are_exact_for_tiny_maps_and_defined_for_zero_maps():
    """A confident-normal map (m ~ 1e-7) still weights exactly; an all-zero map falls back to plain
    pooling."""
    v0 = torch.randn(1, 4, 4, 32)
    m = torch.full((1, 4, 4), 1e-7)
    m[0, 0, 0] = 3e-7
    q, _ = weighted_pool(v0, m, 1)
    expect = (m[0, ..., None] * v0[0]).sum((0, 1)) / m.sum()
    torch.testing.assert_close(q[0, 0], expect, rtol=1e-5, atol=1e-6)
    q0, _ = weighted_pool(v0, torch.zeros(1, 4, 4), 1)
    torch.testing.assert_close(q0[0, 0], v0[0].mean((0, 1)), rtol=1e-5, atol=1e-6)
    sel = VTSelector(ExpertConfig.tiny(query_grid=2))
    out = sel(v0, torch.zeros(1, 4, 4), torch.zeros(1))
    torch.testing.assert_close(out.tokens[0, 0], out.tokens[0, 1:].mean(0))
    assert torch.isfinite(out.tokens).all()
    m = torch.zeros(1, 4, 4, requires_grad=True)  # a saturated softmax gives exact zeros
    sel(v0, m, m.mean().reshape(1)).tokens.sum().backward()
    assert torch.isfinite(m.grad).all()


def test_attention_values_are_unprojected_v0():
    cfg = ExpertConfig.tiny()
    torch.manual_seed(0)
    sel = VTSelector(cfg)
    v0 = torch.randn(1, 5, 5, 32) * 3
    out = sel(v0, torch.rand(1, 5, 5), torch.tensor([0.4]))
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(out.tokens[0, 1:], out.attention[0] @ v0.reshape(25, 32))
    # r is a convex combination of the selected tokens
    w = out.weights[0] / out.weights[0].sum()
    torch.testing.assert_close(out.tokens[0, 0], w @ out.tokens[0, 1:], rtol=1e-4, atol=1e-4)
    # A constant v° comes out unchanged, whatever the learned Q/K projections are.
    c = torch.randn(32)
    const = sel(c.expand(1, 5, 5, 32).clone(), torch.rand(1, 5, 5), torch.tensor([0.9]))
    torch.testing.assert_close(const.tokens[0], c.expand(5, 32), rtol=1e-5, atol=1e-5)


def test_identity_projector_is_exact_and_pads_or_truncates():
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    same = _expert().mark_trained()(levels, v0)
    assert torch.equal(same.projected_tokens, same.tokens)
    wide = _expert(llm_dim=40).mark_trained()(levels, v0)
    assert torch.equal(wide.projected_tokens[:, :32], wide.tokens)
    assert torch.equal(wide.projected_tokens[:, 32:], torch.zeros(5, 8))
    narrow = _expert(llm_dim=20).mark_trained()(levels, v0)
    assert torch.equal(narrow.projected_tokens, narrow.tokens[:, :20])


# ------------------------------------------------------------------------------------------------------------
# Level word, provenance of the map, reference fusion
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "score, word",
    [(0.0, 0), (0.2999, 0), (0.3, 1), (0.5, 1), (0.6999, 1), (0.7, 2), (1.0, 2)],
)
def test_level_word_thresholds(score, word):
    assert level_word(score) == LEVEL_WORDS[word]
    assert _expert().level_word(score) == LEVEL_WORDS[word]


def test_level_words_match_the_backbones_vocabulary():
    from anomaly_assistant import backbones

    assert tuple(LEVEL_WORDS) == tuple(backbones.LEVEL_WORDS)


def test_untrained_without_references_says_so():
    expert = _expert()
    assert not expert.is_trained
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    out = expert(levels, v0)
    assert out.map_source == "none" and not out.meaningful and "untrained" in out.note
    assert out.anomaly_map is None and out.score is None and out.level_word is None
    # Tokens still exist (K fixed), built from a uniform map: the queries are plain pools of v°.
    assert out.tokens.shape == (5, 32)
    # The raw LTFM fields stay available for training.
    assert out.level_maps.shape == (2, 4, 4) and out.score_logit.shape == ()
    forced = expert(levels, v0, use_ltfm=True)
    assert forced.map_source == "ltfm" and forced.anomaly_map is not None
    assert expert(levels, v0).map_source == "none"  # use_ltfm does not stick


def test_reference_alone_when_untrained_and_fused_when_trained():
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    ref_map = torch.zeros(8, 8)
    ref_map[0:2, 4:6] = 0.9  # one token of the 4x4 grid: (0, 2)
    ref = ReferenceMatch(ref_map, 0.8)
    expert = _expert()
    only = expert(levels, v0, reference=ref)
    assert only.map_source == "reference" and only.meaningful
    assert float(only.score) == pytest.approx(0.8)
    assert only.level_word == LEVEL_WORDS[2]
    assert tuple(np.unravel_index(int(only.anomaly_map.argmax()), (4, 4))) == (0, 2)
    torch.testing.assert_close(only.anomaly_map, only.reference_map)
    expert.mark_trained()
    fused = expert(levels, v0, reference=ref).detach()
    assert fused.map_source == "ltfm+reference" and not fused.tokens.requires_grad
    w = expert.config.map_fusion
    torch.testing.assert_close(fused.anomaly_map, (1 - w) * fused.ltfm_map + w * fused.reference_map)
    s = expert.config.score_fusion
    assert float(fused.score) == pytest.approx(
        (1 - s) * float(torch.sigmoid(fused.score_logit)) + s * 0.8, abs=1e-6
    )


def test_flipped_views_scores_are_averaged_into_the_ltfm_score_before_fusion():
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    ref = ReferenceMatch(torch.zeros(8, 8), 0.6)
    expert = _expert().mark_trained()
    with torch.no_grad():
        (plain,) = expert.forward_batch([levels], [v0], reference=[ref])
        (viewed,) = expert.forward_batch([levels], [v0], reference=[ref], view_scores=[[0.9, 0.3]])
    own = float(torch.sigmoid(plain.score_logit))
    assert float(plain.ltfm_score) == pytest.approx(own, abs=1e-6)
    assert float(viewed.ltfm_score) == pytest.approx((own + 0.9 + 0.3) / 3, abs=1e-6)
    s = expert.config.score_fusion
    assert float(viewed.score) == pytest.approx((1 - s) * float(viewed.ltfm_score) + s * 0.6, abs=1e-6)
    torch.testing.assert_close(viewed.score_logit, plain.score_logit)  # what training reads is the image's
    with pytest.raises(ValueError, match="one entry per image"):
        expert.forward_batch([levels], [v0], view_scores=[[0.9], [0.3]])


def test_a_trained_expert_selects_on_its_own_map_whatever_the_reference():
    """No training stage shows the expert a reference, so its selector and score head never read one."""
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    ref_map = torch.zeros(8, 8)
    ref_map[6:8, 0:2] = 1.0  # a corner the LTFM map does not single out
    expert = _expert().mark_trained()
    alone = expert(levels, v0).detach()
    with_ref = expert(levels, v0, reference=ReferenceMatch(ref_map, 0.9)).detach()
    torch.testing.assert_close(with_ref.tokens, alone.tokens)
    torch.testing.assert_close(with_ref.score_logit, alone.score_logit)
    torch.testing.assert_close(with_ref.significance, alone.significance)
    assert not torch.allclose(with_ref.anomaly_map, alone.anomaly_map)  # the published map is fused
    assert float(with_ref.score) != pytest.approx(float(alone.score))  # and so is the score


def test_memory_bank_reference_finds_the_planted_patch(toy_backbone):
    """A real `reference.MemoryBank` fitted on normal images makes an untrained expert localise the defect."""
    from anomaly_assistant.expert.reference import BankConfig, MemoryBank

    images, _, labels = planted(8, seed=5)
    levels, _ = toy_backbone(images)
    normals = [lv for lv, y in zip(levels, labels) if y == 0]
    bank = MemoryBank(BankConfig(blur_sigma=0.0)).fit(normals)
    query_images, query_masks, _ = planted(2, seed=11)  # image 0 anomalous, image 1 normal
    q_levels, q_v0 = toy_backbone(query_images)
    outs = _expert().forward_batch(q_levels, q_v0, reference=bank)
    assert [o.map_source for o in outs] == ["reference", "reference"]
    assert float(outs[0].score) > float(outs[1].score)
    gt = resize_mask(query_masks[0], (4, 4)) > 0.25
    amap = outs[0].anomaly_map
    assert float(amap[gt].mean()) > float(amap[~gt].mean()) + 0.2


def test_screen_results_and_mismatched_banks():
    """A screener's result (map at original resolution) is accepted; a bank on other features is refused
    clearly."""
    from anomaly_assistant.expert.reference import MemoryBank, ScreenResult

    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32))
    amap = np.zeros((120, 160), np.float32)
    amap[90:120, 0:40] = 0.95  # bottom-left token of the 4x4 grid
    out = _expert()(levels, v0, reference=ScreenResult(0.9, amap, True))
    assert out.map_source == "reference" and float(out.score) == pytest.approx(0.9)
    assert tuple(np.unravel_index(int(out.anomaly_map.argmax()), (4, 4))) == (3, 0)
    other = MemoryBank().fit([[torch.randn(6, 6, 40)], [torch.randn(6, 6, 40)]])
    with pytest.raises(ValueError, match="same feature source"):
        _expert()(levels, v0, reference=other)


# ------------------------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------------------------
def test_save_and_reload_is_exact(tmp_path):
    expert = _expert(seed=3, llm_dim=24)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the projector is no longer the identity
    expert.mark_trained()
    expert.save_pretrained(tmp_path / "expert")
    assert sorted(p.name for p in (tmp_path / "expert").iterdir()) == [
        "expert.safetensors",
        "expert_config.json",
    ]
    cfg = json.loads((tmp_path / "expert" / "expert_config.json").read_text())
    assert cfg["llm_dim"] == 24 and cfg["level_dims"] == [16, 16]
    again = AnomalyExpert.from_pretrained(tmp_path / "expert")
    assert again.is_trained and again.config == expert.config
    levels, v0 = _inputs([(8, 8), (4, 4)], (4, 4, 32), seed=9)
    a, b = expert(levels, v0), again(levels, v0)
    for name in ("anomaly_map", "score", "tokens", "projected_tokens", "level_maps", "score_logit"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.level_word == b.level_word and b.map_source == "ltfm"


def test_untrained_flag_and_dtype_survive_reload(tmp_path):
    _expert().to(torch.bfloat16).save_pretrained(tmp_path)
    again = AnomalyExpert.from_pretrained(tmp_path)
    assert not again.is_trained and again.projector.linear.weight.dtype == torch.bfloat16
    assert (
        AnomalyExpert.from_pretrained(tmp_path, dtype=torch.float32).ltfm.descriptors.dtype == torch.float32
    )


def test_config_json_round_trip_and_validation():
    cfg = ExpertConfig.tiny(query_grid=3, llm_dim=64, feature_source="efficientnet_lite0")
    back = ExpertConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg and back.num_tokens == 10 and back.out_dim == 64
    with pytest.raises(ValueError):
        ExpertConfig(feature_source="resnet")
    with pytest.raises(ValueError):
        ExpertConfig(level_thresholds=[0.7, 0.3])
    with pytest.raises(ValueError):
        ExpertConfig.from_dict({"no_such_field": 1})
    assert ExpertConfig.from_dict({"score_views": ["vflip", "hflip"]}).score_views == ["vflip", "hflip"]
    for bad in (["rot90"], "hflip"):
        with pytest.raises(ValueError, match="score_views"):
            ExpertConfig(score_views=bad)


def test_default_size_matches_anomaly_ov():
    """Anomaly-OV's expert has about 7.1 M parameters; ours without the extra projector lands there too."""
    expert = AnomalyExpert(ExpertConfig())
    n = sum(p.numel() for p in expert.parameters()) - sum(p.numel() for p in expert.projector.parameters())
    assert 6.8e6 < n < 7.4e6


# ------------------------------------------------------------------------------------------------------------
# Stage-1 losses
# ------------------------------------------------------------------------------------------------------------
def test_balanced_bce_weights_classes_equally():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert float(balanced_bce(logits, labels)) == pytest.approx(
        0.5 * float(per[0]) + 0.5 * float(per[1:].mean())
    )
    assert float(balanced_bce(logits[1:], labels[1:])) == pytest.approx(float(per[1:].mean()))


def test_none_masks_skip_mask_terms_and_bce_reaches_the_ltfm():
    expert = _expert()
    items = [_inputs([(8, 8), (4, 4)], (4, 4, 32), seed=s) for s in range(3)]
    outs = expert.forward_batch([lv for lv, _ in items], [v for _, v in items], use_ltfm=True)
    losses = stage1_loss(outs, [1.0, 0.0, 0.0], [None, None, None])
    assert float(losses["focal"]) == 0.0 and float(losses["dice"]) == 0.0
    losses["loss"].backward()
    # The image label alone trains the LTFM: gradients flow through the selector's m-weighted pooling.
    assert expert.ltfm.adapters[0].weight.grad.abs().sum() > 0
    assert expert.ltfm.descriptors.grad.abs().sum() > 0
    assert expert.ltfm.lookback.token_mix.weight.grad.abs().sum() > 0


def test_mask_resize_is_area_fraction():
    mask = torch.zeros(32, 32)
    mask[0:8, 0:4] = 1
    small = resize_mask(mask, (4, 4))
    assert float(small[0, 0]) == pytest.approx(0.5) and float(small.sum()) == pytest.approx(0.5)


def test_training_on_planted_patches_learns_the_map(toy_backbone):
    torch.manual_seed(0)
    expert = AnomalyExpert(ExpertConfig.tiny())
    opt = torch.optim.AdamW(expert.parameters(), lr=1e-2)
    history = []
    for step in range(30):
        images, masks, labels = planted(8, seed=1000 + step)
        levels, v0 = toy_backbone(images)
        losses = stage1_loss(expert.forward_batch(levels, v0, use_ltfm=True), labels, masks)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.6 * first["loss"]
    assert np.mean([h["focal"] + h["dice"] for h in history[-5:]]) < 0.5 * (first["focal"] + first["dice"])
    assert np.mean([h["bce"] for h in history[-5:]]) < first["bce"]
    expert.mark_trained().eval()
    images, masks, labels = planted(8, seed=99)
    levels, v0 = toy_backbone(images)
    with torch.no_grad():
        outs = expert.forward_batch(levels, v0)
    for o, m, y in zip(outs, masks, labels):
        assert o.map_source == "ltfm"
        if y:
            gt = resize_mask(m, (4, 4)) > 0.25
            assert float(o.anomaly_map[gt].mean()) > float(o.anomaly_map[~gt].mean()) + 0.3
    anomalous = [float(o.anomaly_map.max()) for o, y in zip(outs, labels) if y]
    normal = [float(o.anomaly_map.max()) for o, y in zip(outs, labels) if not y]
    assert min(anomalous) > max(normal)


# ------------------------------------------------------------------------------------------------------------
# Both feature sources feed the expert
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet_source():
    pytest.importorskip("efficientnet_lite_pytorch")
    from anomaly_assistant.expert.sources import EfficientNetLite0Config, EfficientNetLite0Source

    options = {"image_size": 128, "blocks": (4, 10), "resize": "square", "pad": 0}  # a fixed 16x16 / 8x8 grid
    return EfficientNetLite0Source(EfficientNetLite0Config(**options)), options


def _real_image(size=(160, 120)):
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.coffee()).resize(size)


def test_efficientnet_source_feeds_the_expert(effnet_source, tmp_path):
    from anomaly_assistant.expert.sources import EfficientNetLite0Config

    source, options = effnet_source
    [levels] = source([_real_image()])
    assert [tuple(g.shape) for g in levels] == [(16, 16, 40), (8, 8, 112)]
    # Standalone screening: no LLM, the last level doubles as v°.
    cfg = ExpertConfig.tiny(
        feature_source="efficientnet_lite0", source_options=options, level_dims=source.channels, token_dim=112
    )
    alone = AnomalyExpert(cfg)
    alone.save_pretrained(tmp_path)  # the checkpoint records how to rebuild its source
    saved = AnomalyExpert.from_pretrained(tmp_path).config.source_options
    assert EfficientNetLite0Config(**saved).blocks == [4, 10] and saved["image_size"] == 128
    out = alone.mark_trained()(levels)
    assert out.anomaly_map.shape == (8, 8) and out.tokens.shape == (5, 112)
    # Beside an LLM: CNN levels, v° from the backbone on its own (coarser) token grid.
    paired = _expert(feature_source="efficientnet_lite0", level_dims=[40, 112]).mark_trained()
    out = paired(levels, torch.randn(5, 6, 32))
    assert out.anomaly_map.shape == (5, 6) and out.level_maps.shape == (2, 5, 6)


def test_backbone_source_feeds_the_expert():
    """Real tiny Qwen2.5-VL vision tower: levels on the 14-px patch grid, v° on the 28-px token grid."""
    from anomaly_assistant import backbones, tiny
    from anomaly_assistant.expert.sources import BackboneSource

    model, processor = tiny.build_tiny("qwen2_5_vl", seed=0)
    images = [_real_image((224, 168)), _real_image((112, 168))]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Defect?"}]}]] * 2
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=images, return_tensors="pt", padding=True)
    feats = backbones.get("qwen2_5_vl").vision_features(model, inputs)
    levels = BackboneSource()(feats.level_grids)
    dims = [g.shape[-1] for g in levels[0]]
    expert = AnomalyExpert(
        ExpertConfig.tiny(level_dims=dims, token_dim=feats.v0[0].shape[-1], query_grid=2)
    ).mark_trained()
    outs = expert.forward_batch(levels, feats.v0)
    for out, v in zip(outs, feats.v0):
        assert out.anomaly_map.shape == v.shape[:2]
        assert out.tokens.shape == (5, v.shape[-1])
        assert torch.equal(out.projected_tokens, out.tokens)
