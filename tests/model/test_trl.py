"""TRL trains an anomaly model unchanged: one SFT step moves the LoRA weights and the expert tokens are
injected."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from anomaly_assistant.grammar import render_answer
from anomaly_assistant.modeling import tiny_anomaly_model
from anomaly_assistant.prompts import INSPECTION_PROMPT


def _rows(n=4):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = Image.fromarray((rng.random((96, 128, 3)) * 255).astype("uint8"))
        answer = render_answer("looks fine" if i % 2 else "a dark spot", "normal" if i % 2 else "anomalous",
                               None if i % 2 else "stain", [] if i % 2 else [[10, 10, 40, 40]], "r")
        rows.append({"images": [image], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_sft_step_with_lora_injects_expert_tokens(family, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, processor = tiny_anomaly_model(family)
    calls = []
    original = model.model.anomaly_embeds  # the inner model injects: TRL's fused head calls it directly

    def spy(input_ids, inputs):
        calls.append(int((input_ids == model.config.anomaly_pad_token_id).sum()))
        return original(input_ids, inputs)

    model.model.anomaly_embeds = spy
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2,
                     max_length=None, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                     assistant_only_loss=True, dataloader_num_workers=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=_rows(), processing_class=processor, peft_config=lora
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    k = model.expert.config.num_tokens
    assert calls and all(c == 2 * k for c in calls)
    assert np.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "llava"])
def test_assistant_only_loss_falls_on_the_assistant_turns_exactly(family, tmp_path):
    """The labels TRL builds for `assistant_only_loss` are exactly the assistant turns' tokens.

    The processor inserts the block after each image placeholder; the assistant mask is computed from
    character offsets in the rendered template, so the block must be among the expansions the processor
    reports, or every label would sit a block's length early, on prompt tokens.
    """
    from trl import SFTConfig, SFTTrainer

    model, processor = tiny_anomaly_model(family)
    rng = np.random.default_rng(1)
    answers = [render_answer("a dark spot", "anomalous", "stain", [[10, 10, 40, 40]], "r"),
               "A scratch from handling.", render_answer("fine", "normal", None, [], "ok")]
    rows = [
        {"images": [Image.fromarray((rng.random((96, 128, 3)) * 255).astype("uint8"))], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
            {"role": "user", "content": [{"type": "text", "text": "What caused it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[1]}]},
        ]},
        {"images": [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[2]}]},
        ]},
    ]
    args = SFTConfig(output_dir=str(tmp_path), max_length=None, use_cpu=True, report_to=[],
                     assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    tokenizer = processor.tokenizer
    learned = [tokenizer.decode(ids[labels != -100], skip_special_tokens=True)
               for ids, labels in zip(batch["input_ids"], batch["labels"])]
    def squeeze(text):  # the templates differ in the whitespace between turns
        return "".join(text.split())

    assert [squeeze(t) for t in learned] == [squeeze(answers[0] + answers[1]), squeeze(answers[2])]
    pads = batch["input_ids"] == model.config.anomaly_pad_token_id
    assert not (pads & (batch["labels"] != -100)).any()  # no prompt token (the anomaly block) is learned
