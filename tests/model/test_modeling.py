"""Anomaly*ForConditionalGeneration on tiny models of all three families and both feature sources."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from anomaly_assistant import backbones
from anomaly_assistant.backbones import ANOMALY_END, ANOMALY_LEVEL, ANOMALY_PAD, ANOMALY_START, FAMILIES
from anomaly_assistant.expert import ReferenceMatch
from anomaly_assistant.modeling import (
    from_backbone,
    from_config,
    load_backbone_as_anomaly,
    tiny_anomaly_model,
)
from anomaly_assistant.tiny import build_tiny, save_tiny

SOURCES = ("backbone", "efficientnet_lite0")
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it ok?"}]}]


@pytest.fixture(scope="session")
def tiny_models():
    return {(f, s): tiny_anomaly_model(f, s) for f in FAMILIES for s in SOURCES}


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((100, 150, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((130, 90, 3)) * 255).astype("uint8"))]


def _batch(processor, images):
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)


def _ids(processor, token):
    return processor.tokenizer.convert_tokens_to_ids(token)


def _lm_inputs_embeds(model, call):
    """inputs_embeds that reach the language model during `call()`."""
    seen = {}

    def hook(_module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = call()
    finally:
        handle.remove()
    return seen["embeds"], result


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_k_bookkeeping_and_shapes(tiny_models, family, source):
    model, processor = tiny_models[(family, source)]
    k = model.expert.config.num_tokens
    assert k == 1 + model.expert.config.query_grid ** 2 == processor.num_anomaly_tokens
    batch = _batch(processor, _images())
    ids = batch["input_ids"]
    for row in ids:
        assert (row == _ids(processor, ANOMALY_PAD)).sum() == k
        for token in (ANOMALY_START, ANOMALY_LEVEL, ANOMALY_END):
            assert (row == _ids(processor, token)).sum() == 1
    assert ("expert_pixel_values" in batch) == (source == "efficientnet_lite0")
    with torch.no_grad(), model.anomaly_context() as ctx:
        out = model(**batch, labels=ids)
    assert torch.isfinite(out.loss)
    assert len(ctx.outputs) == 2
    hidden = model.config.text_config.hidden_size
    for o in ctx.outputs:
        assert o.projected_tokens.shape == (k, hidden)
        assert o.map_source == "none" and o.anomaly_map is None  # untrained, no references: says so


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholders_carry_exactly_the_expert_tokens(tiny_models, family):
    model, processor = tiny_models[(family, "backbone")]
    batch = _batch(processor, _images(1))
    ids = batch["input_ids"]
    refs = [ReferenceMatch(torch.rand(6, 6), 0.9), ReferenceMatch(torch.rand(5, 7), 0.1)]
    with torch.no_grad(), model.anomaly_context(reference=refs) as ctx:
        embeds, _ = _lm_inputs_embeds(model, lambda: model(**batch))
    plain_inner = type(model.model).__mro__[2]  # the family's own inner model class, behind the anomaly mixin
    assert plain_inner.__module__.startswith("transformers.")
    with torch.no_grad():
        plain, _ = _lm_inputs_embeds(model, lambda: plain_inner.forward(model.model, **batch))
    pad = ids == _ids(processor, ANOMALY_PAD)
    level = ids == _ids(processor, ANOMALY_LEVEL)
    block = pad | level
    expected = torch.cat([o.projected_tokens for o in ctx.outputs])
    torch.testing.assert_close(embeds[pad], expected, rtol=0, atol=0)
    # everything outside the block (text and image tokens before it, text after it) is what the family
    # computes
    torch.testing.assert_close(embeds[~block], plain[~block], rtol=1e-6, atol=1e-6)
    # the level slot holds the word the score selects: "highly" for 0.9, "slightly" for 0.1
    table = model.get_input_embeddings()
    words = model.config.level_word_token_ids
    assert [o.level_word.split()[0] for o in ctx.outputs] == ["highly", "slightly"]
    torch.testing.assert_close(embeds[level][0], table(torch.tensor(words[2])).mean(0))
    torch.testing.assert_close(embeds[level][1], table(torch.tensor(words[0])).mean(0))


def test_untrained_expert_without_references_leaves_the_level_slot_alone(tiny_models):
    model, processor = tiny_models[("qwen2_5_vl", "backbone")]
    batch = _batch(processor, _images(2)[:1])
    with torch.no_grad():
        embeds, _ = _lm_inputs_embeds(model, lambda: model(**batch))
    slot = batch["input_ids"] == _ids(processor, ANOMALY_LEVEL)
    own = model.get_input_embeddings()(torch.tensor(_ids(processor, ANOMALY_LEVEL)))
    torch.testing.assert_close(embeds[slot][0], own)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_identical_outputs(tiny_models, family, source, tmp_path):
    model, processor = tiny_models[(family, source)]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(model) and type(reprocessor) is type(processor)
    assert reprocessor.num_anomaly_tokens == processor.num_anomaly_tokens
    for key, value in model.expert.state_dict().items():
        assert torch.equal(value, reloaded.expert.state_dict()[key]), key
    refs = [ReferenceMatch(torch.rand(4, 4), 0.6)] * 2
    batch, batch2 = _batch(processor, _images(3)), _batch(reprocessor, _images(3))
    with torch.no_grad(), model.anomaly_context(refs) as c1, reloaded.anomaly_context(refs) as c2:
        a, b = model(**batch).logits, reloaded(**batch2).logits
    assert (a - b).abs().max().item() == 0.0
    assert all(torch.equal(x.projected_tokens, y.projected_tokens) for x, y in zip(c1.outputs, c2.outputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batched_images_of_different_sizes(tiny_models, family):
    model, processor = tiny_models[(family, "backbone")]
    batch = _batch(processor, _images(4))
    with torch.no_grad(), model.anomaly_context() as ctx:
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] >= batch["input_ids"].shape[1] + 1
    assert len(ctx.outputs) == 2  # the expert ran once, on the prefill
    # the batched rows continue exactly like single-image generation
    for i, image in enumerate(_images(4)):
        single = _batch(processor, [image])
        with torch.no_grad():
            one = model.generate(**single, max_new_tokens=5, do_sample=False)
        new_single = one[0, single["input_ids"].shape[1]:]
        new_batched = out[i, batch["input_ids"].shape[1]:][: len(new_single)]
        assert new_single.tolist() == new_batched.tolist()


def test_lora_wrapped_model_still_injects(tiny_models):
    from peft import LoraConfig, get_peft_model

    base, processor = tiny_anomaly_model("qwen2_5_vl", "backbone", seed=1)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    )
    assert any("lora" in n for n, _ in lora.named_parameters())
    assert not any("lora" in n for n, _ in lora.named_parameters() if ".visual." in n or ".expert." in n)
    batch = _batch(processor, _images(5))
    refs = [ReferenceMatch(torch.rand(4, 4), 0.5)] * 2
    with base.anomaly_context(refs) as ctx:
        embeds, out = _lm_inputs_embeds(base, lambda: lora(**batch, labels=batch["input_ids"]))
    out.loss.backward()
    pad = batch["input_ids"] == _ids(processor, ANOMALY_PAD)
    torch.testing.assert_close(embeds[pad], torch.cat([o.projected_tokens for o in ctx.outputs]).detach())
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    with torch.no_grad(), base.anomaly_context() as ctx2:
        lora.generate(**batch, max_new_tokens=3, do_sample=False)
    assert len(ctx2.outputs) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_backbone_checkpoint_loads_with_a_new_expert(family, tmp_path):
    save_tiny(family, tmp_path)
    model, processor = load_backbone_as_anomaly(str(tmp_path))
    assert type(model) is backbones.get(family).ANOMALY_MODEL_CLASS
    batch = _batch(processor, _images(6)[:1])
    with torch.no_grad(), model.anomaly_context() as ctx:
        model(**batch)
    (o,) = ctx.outputs
    torch.testing.assert_close(o.projected_tokens, o.tokens)  # identity-initialised projector
    # the backbone's own weights arrived unchanged
    plain, _ = build_tiny(family)
    torch.testing.assert_close(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)


def test_wrong_number_of_blocks_is_a_clear_error(tiny_models):
    model, processor = tiny_models[("llava", "backbone")]
    batch = _batch(processor, _images(7)[:1])
    ids = batch["input_ids"].clone()
    ids[ids == _ids(processor, ANOMALY_PAD)] = processor.tokenizer.pad_token_id
    ids[0, -1] = _ids(processor, ANOMALY_PAD)  # one stray placeholder
    with pytest.raises(ValueError, match="anomaly placeholders"):
        model(**{**batch, "input_ids": ids})


def test_from_backbone_rejects_unknown_feature_source():
    model, processor = build_tiny("llava")
    with pytest.raises(ValueError, match="feature source"):
        from_backbone(model, processor, feature_source="sift")


@pytest.mark.parametrize("family", FAMILIES)
def test_from_config_builds_a_random_model_in_the_asked_dtype_that_injects(family):
    """Real-width benchmarks build from a config alone; the tiny config stands in for the real one here."""
    backbone, plain = build_tiny(family)
    model, processor = from_config(backbone.config, plain, "efficientnet_lite0", dtype=torch.float64)
    assert type(model) is backbones.get(family).ANOMALY_MODEL_CLASS and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert torch.get_default_dtype() == torch.float32
    assert model.config.expert["feature_source"] == "efficientnet_lite0"
    batch = _batch(processor, _images(8)[:1])
    with torch.no_grad(), model.anomaly_context() as ctx:
        embeds, _ = _lm_inputs_embeds(model, lambda: model(**batch))
    (o,) = ctx.outputs
    pad = batch["input_ids"] == _ids(processor, ANOMALY_PAD)
    torch.testing.assert_close(embeds[pad], o.projected_tokens)


def test_from_config_refuses_a_tokenizer_that_does_not_fit():
    backbone, plain = build_tiny("llava")
    small = backbone.config.__class__.from_dict(backbone.config.to_dict())
    small.text_config.vocab_size = len(plain.tokenizer) - 1
    with pytest.raises(ValueError, match="vocabulary"):
        from_config(small, plain)


def test_family_detection_for_anomaly_configs(tiny_models):
    for (family, _), (model, _) in tiny_models.items():
        assert backbones.family_of(model.config) == family


def test_from_config_refuses_a_tokenizer_without_the_anomaly_markers():
    from types import SimpleNamespace

    from transformers import Qwen2Tokenizer

    from anomaly_assistant.tiny import _bpe

    backbone, _ = build_tiny("qwen2_5_vl")
    vocab, merges = _bpe()
    bare = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
    )
    with pytest.raises(ValueError, match="anomaly markers"):
        from_config(backbone.config, SimpleNamespace(tokenizer=bare))
