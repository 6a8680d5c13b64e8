"""Tiny backbones: build, forward with loss, generate, save/reload, processors, tokenizer, chat templates."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import noise_image
from transformers import AutoProcessor

from anomaly_assistant import backbones, tiny
from anomaly_assistant.backbones import ANOMALY_TOKENS, FAMILIES, LEVEL_WORDS

PROCESSOR_CLASS = {
    "qwen2_5_vl": "ImageOnlyQwen2_5_VLProcessor",
    "llava_onevision": "ImageOnlyLlavaOnevisionProcessor",
    "llava": "LlavaProcessor",
}


def conversation(answer: str = "The part is normal.") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a defect?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def batch(processor, sizes=((150, 200), (300, 97)), answer="The part is normal."):
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = processor.apply_chat_template([conversation(answer)] * len(images), tokenize=False)
    return processor(text=text, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_loss_and_generate(tiny_backbones, family):
    model, processor = tiny_backbones[family]
    assert backbones.family_of(model.config) == family
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    inputs = batch(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()  # the whole stack is differentiable, vision tower included
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)

    prompt = processor.apply_chat_template(conversation()[:1], add_generation_prompt=True, tokenize=False)
    gen_inputs = processor(text=[prompt], images=[noise_image(120, 90, 3)], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**gen_inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape[1] == gen_inputs["input_ids"].shape[1] + 6


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_identical(tiny_backbones, saved_backbones, family):
    model, processor = tiny_backbones[family]
    module = backbones.get(family)
    model2, processor2 = module.load(str(saved_backbones[family]))
    inputs = batch(processor)
    inputs2 = batch(processor2)
    for key in inputs:
        assert torch.equal(torch.as_tensor(inputs[key]), torch.as_tensor(inputs2[key])), key
    with torch.no_grad():
        diff = (model(**inputs).logits - model2(**inputs2).logits).abs().max().item()
    assert diff == 0.0

    auto = AutoProcessor.from_pretrained(saved_backbones[family])
    assert type(auto).__name__ == PROCESSOR_CLASS[family]
    assert isinstance(auto, type(processor))
    for token in ANOMALY_TOKENS:
        assert auto.tokenizer.convert_tokens_to_ids(token) == processor.tokenizer.convert_tokens_to_ids(token)
    assert auto.chat_template == processor.chat_template
    assert auto.image_token_id == backbones.image_token_id(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_special_tokens_and_round_trip(tiny_backbones, family):
    _, processor = tiny_backbones[family]
    tok = processor.tokenizer
    ids = backbones.anomaly_token_ids(tok)
    assert len(set(ids.values())) == len(ANOMALY_TOKENS) == 4  # start, pad, end, level slot
    block = f"{ANOMALY_TOKENS[0]}{LEVEL_WORDS[1]}{ANOMALY_TOKENS[1] * 4}{ANOMALY_TOKENS[2]}"
    enc = tok(block, add_special_tokens=False)["input_ids"]
    assert enc[0] == ids[ANOMALY_TOKENS[0]] and enc[-1] == ids[ANOMALY_TOKENS[2]]
    assert enc.count(ids[ANOMALY_TOKENS[1]]) == 4
    # the level word is plain text: several ordinary tokens, none of them special
    word_ids = tok(LEVEL_WORDS[1], add_special_tokens=False)["input_ids"]
    assert not set(word_ids) & set(tok.all_special_ids)
    text = 'Ünïcode 😀 <answer>{"verdict": "anomalous", "boxes": [[1, 2, 3, 4]]}</answer>\n\tend'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # a domain word is one or two tokens, not one per byte
    assert len(tok(" scratch", add_special_tokens=False)["input_ids"]) <= 2
    assert backbones.add_anomaly_tokens(tok) == 0  # idempotent


@pytest.mark.parametrize(
    ("family", "transformers_class"),
    [("qwen2_5_vl", "Qwen2_5_VLProcessor"), ("llava_onevision", "LlavaOnevisionProcessor")],
)
def test_load_real_style_processor_files(saved_backbones, tmp_path, family, transformers_class):
    """A real checkpoint names transformers' own processor class: `load` still gives the image-only one."""
    src = saved_backbones[family]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["processor_class"] = transformers_class
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    _, processor = backbones.get(family).load(str(tmp_path))
    assert type(processor).__name__ == PROCESSOR_CLASS[family]
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def test_ensure_anomaly_tokens_grows_embeddings(tiny_backbones):
    model, processor = tiny_backbones["llava"]
    model, tok = copy.deepcopy(model), copy.deepcopy(processor.tokenizer)
    rows = backbones.text_embeddings(model).num_embeddings
    assert backbones.ensure_anomaly_tokens(model, tok) == 0  # tiny models have them already
    assert backbones.text_embeddings(model).num_embeddings == rows
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 5)])  # now the table is too small
    backbones.ensure_anomaly_tokens(model, tok)
    assert backbones.text_embeddings(model).num_embeddings >= len(tok) > rows


def test_tokenizer_is_deterministic():
    a, b = tiny.build_tokenizer("qwen2_5_vl"), tiny.build_tokenizer("qwen2_5_vl")
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_generation_markers(tiny_backbones, family):
    _, processor = tiny_backbones[family]
    assert "{%- generation" in processor.chat_template or "{% generation" in processor.chat_template
    tok = processor.tokenizer
    answer = "<think>dark line</think><answer>{\"verdict\": \"anomalous\"}</answer>"
    messages = [
        {"role": "user", "content": "Is there a defect?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Top left."}]},
    ]
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    # the turn's end token is learned too (Qwen's template, like TRL's, also keeps the newline after it)
    end = tok.eos_token + ("\n" if family == "qwen2_5_vl" else "")
    lead = " " if family == "llava" else ""  # LLaVA-1.5 answers start with a space after "ASSISTANT:"
    assert masked == lead + answer + end + lead + "Top left." + end
    # training rendering of the prompt equals the generation prompt (same prefix at inference)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages[:2], tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].lstrip(" ").startswith(answer)


def test_family_lookup():
    assert [backbones.get(f).FAMILY for f in FAMILIES] == list(FAMILIES)
    assert backbones.family_of({"model_type": "llava"}) == "llava"
    assert backbones.family_of({"model_type": "anomaly_llava_onevision"}) == "llava_onevision"
    with pytest.raises(ValueError):
        backbones.family_of({"model_type": "bert"})
    with pytest.raises(ValueError):
        backbones.get("qwen2_vl")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wider_deeper_tiny_llm_builds_and_learns_one_step(family):
    """`build_tiny(..., **llm)` sizes the LLM (and the projector into it); unknown sizes are refused."""
    model, processor = tiny.build_tiny(family, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=8, num_key_value_heads=4)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (128, 3)
    inputs = batch(processor, sizes=((112, 112),))
    loss = model.train()(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown tiny LLM sizes.*hidden"):
        tiny.build_tiny(family, hiden_size=128)
