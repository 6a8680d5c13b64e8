"""The family registry is the only list of families, and a family's resize rule has one home.

Training targets (data_builders, no checkpoint at hand) and parsed answers (the assistant, with the
checkpoint's processor) must put boxes in the same frame, or a model trained on the targets answers in the
wrong pixels.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from anomaly_assistant import backbones, tiny
from anomaly_assistant.backbones import FAMILIES
from anomaly_assistant.data_builders.conversations import inspection_answer
from anomaly_assistant.data_builders.records import Record
from anomaly_assistant.grammar import parse_answer
from anomaly_assistant.modeling import anomaly_processor, tiny_anomaly_model

LARGE = (2000, 1500)  # 3 MP: above the 1 MP budget that processors are often built with
# The real checkpoints' input size for a 2000x1500 image (their preprocessor_config.json resize rules):
# Qwen2.5-VL smart-resizes to multiples of 28 within 12845056 pixels; LLaVA-OneVision squashes to 384x384;
# LLaVA-1.5 resizes the shortest edge to 336 and centre-crops 336x336.
REAL_INPUT_SIZE = {"qwen2_5_vl": (1988, 1512), "llava_onevision": (384, 384), "llava": (336, 336)}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_target_and_parsed_answer_share_the_frame_of_a_large_image(family):
    module = backbones.get(family)
    target_frame = backbones.input_frame(family, LARGE)  # what data_builders writes targets in
    assert target_frame.input_size == REAL_INPUT_SIZE[family]

    # the assistant's side: the family's default processor (the real checkpoint's), wrapped for the expert
    default = module.build_processor(tiny.build_tokenizer(family))
    processor = anomaly_processor(default, family, num_anomaly_tokens=5)
    answer_frame = module.input_frame(processor, LARGE)  # what the assistant parses answers with
    assert answer_frame == target_frame

    gt = [850.0, 600.0, 1210.0, 930.0]  # inside LLaVA's centre crop too
    record = Record("part.png", 1, gt_boxes=[gt], defect_type="scratch", category="plate", image_size=LARGE)
    answer, boxes_input = inspection_answer(record, target_frame, rng=0, rewrite=None)
    parsed = parse_answer(answer, frame=answer_frame)
    assert parsed.ok and [b.as_list() for b in parse_answer(answer).boxes] == boxes_input
    (box,) = parsed.boxes
    one_input_pixel = float(1 / min(answer_frame.scale))  # targets are written in whole input pixels
    assert all(abs(a - b) <= one_input_pixel for a, b in zip(box.as_list(), gt)), (box, gt)


def test_tiny_processors_keep_their_own_budget_while_defaults_follow_the_real_checkpoint():
    qwen = backbones.get("qwen2_5_vl")
    tokenizer = tiny.build_tokenizer("qwen2_5_vl")
    assert qwen.build_processor(tokenizer).image_processor.size["longest_edge"] == qwen.MAX_PIXELS == 12845056
    assert qwen.build_tiny_processor(tokenizer).image_processor.size["longest_edge"] == qwen.TINY_MAX_PIXELS


# A fourth family from outside the package: LLaVA-1.5's architecture under a model_type of its own. Its module
# is the whole addition; the test then adds the one registry line.
FOURTH_FAMILY = '''
    """A fourth family for the registry test: LLaVA-1.5 under its own model_type, in one module."""

    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel

    from anomaly_assistant.backbones.llava import (  # noqa: F401  (the family's hooks, reused as they are)
        CHAT_TEMPLATE, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, PROCESSOR_CLASS, SPECIAL_TOKENS,
        AnomalyLlavaProcessor, build_image_processor, build_processor, build_tiny_processor, default_levels,
        embeds_forward_kwargs, input_frame, load, vision_features,
    )
    from anomaly_assistant.backbones.llava import tiny_config as llava_tiny_config
    from anomaly_assistant.injection import (
        AnomalyConfigFields, AnomalyInnerMixin, AnomalyOuterMixin, anomaly_forward,
    )

    FAMILY = "fourth_vlm"


    class FourthConfig(LlavaConfig):
        model_type = "fourth_vlm"


    class FourthForConditionalGeneration(LlavaForConditionalGeneration):
        config_class = FourthConfig


    CONFIG_CLASS, MODEL_CLASS = FourthConfig, FourthForConditionalGeneration


    def tiny_config(tokenizer, text):
        data = llava_tiny_config(tokenizer, text).to_dict()
        data.pop("model_type")
        return FourthConfig(**data)


    class AnomalyFourthConfig(AnomalyConfigFields, FourthConfig):
        model_type = "anomaly_fourth_vlm"


    class AnomalyFourthModel(AnomalyInnerMixin, LlavaModel):
        family = FAMILY


    class AnomalyFourthForConditionalGeneration(AnomalyOuterMixin, FourthForConditionalGeneration):
        config_class = AnomalyFourthConfig
        family = FAMILY
        inner_class = AnomalyFourthModel
        forward = anomaly_forward(LlavaForConditionalGeneration)


    ANOMALY_CONFIG_CLASS = AnomalyFourthConfig
    ANOMALY_MODEL_CLASS = AnomalyFourthForConditionalGeneration
    ANOMALY_PROCESSOR_CLASS = AnomalyLlavaProcessor
'''


def test_a_fourth_family_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    (tmp_path / "fourth_vlm.py").write_text(textwrap.dedent(FOURTH_FAMILY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backbones.FAMILIES, "fourth_vlm", "fourth_vlm")  # the one registry line

    module = backbones.get("fourth_vlm")
    assert backbones.family_of({"model_type": "fourth_vlm"}) == "fourth_vlm"
    assert backbones.family_of({"model_type": "anomaly_fourth_vlm"}) == "fourth_vlm"
    assert backbones.input_frame("fourth_vlm", LARGE) == backbones.input_frame("llava", LARGE)

    model, processor = tiny_anomaly_model("fourth_vlm")  # tiny config, tokenizer, expert: via the registry
    assert type(model) is module.ANOMALY_MODEL_CLASS and model.config.model_type == "anomaly_fourth_vlm"
    assert type(processor) is module.ANOMALY_PROCESSOR_CLASS
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it ok?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    batch = processor(images=[Image.new("RGB", (150, 100), (90, 120, 60))], text=[text], return_tensors="pt")
    with torch.no_grad(), model.anomaly_context() as call:
        model(**batch)
    assert len(call.outputs) == 1  # the expert ran inside the new family's forward

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is module.ANOMALY_MODEL_CLASS
    assert type(AutoProcessor.from_pretrained(tmp_path / "saved")) is module.ANOMALY_PROCESSOR_CLASS
