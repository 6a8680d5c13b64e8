"""The exports load straight into TRL's SFTTrainer and GRPOTrainer: one real optimisation step each on tiny
models."""

from __future__ import annotations

import warnings

import pytest
import torch

from anomaly_assistant.data_builders.export import sft_dataset
from anomaly_assistant.grammar import parse_answer

warnings.filterwarnings("ignore", category=FutureWarning)


def _trl_args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **kw,
    )


@pytest.fixture(scope="module")
def datasets_on_disk(built):
    import datasets

    datasets.disable_progress_bars()
    _, out = built
    return datasets.load_from_disk(str(out / "sft")), datasets.load_from_disk(str(out / "grpo"))


def test_sft_one_step_messages_qwen(datasets_on_disk, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from anomaly_assistant.tiny import build_tiny

    sft, _ = datasets_on_disk
    train = sft["train"].filter(lambda r: r["kind"] == "dialogue").select(range(2))  # multi-turn rows
    model, processor = build_tiny("qwen2_5_vl")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _trl_args(SFTConfig, tmp_path, max_length=None, assistant_only_loss=True, learning_rate=1e-3)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_sft_one_step_prompt_completion_llava(built, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from anomaly_assistant.tiny import build_tiny

    result, _ = built
    train = sft_dataset(result.samples["train"][:2], fmt="prompt_completion")
    assert set(train.column_names) >= {"images", "prompt", "completion"}
    model, processor = build_tiny("llava")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model,
        args=_trl_args(SFTConfig, tmp_path, max_length=None, learning_rate=1e-3),
        train_dataset=train,
        processing_class=processor,
    )
    assert trainer.train().global_step == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_grpo_one_step_rewards_see_solution_columns(datasets_on_disk, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from anomaly_assistant.tiny import build_tiny

    _, grpo = datasets_on_disk
    train = grpo["train"].select(range(2))
    seen: list[dict] = []

    def verdict_reward(completions, verdict, solution_boxes, defect_type, frame, **kwargs):
        seen.append({"verdict": list(verdict), "boxes": list(solution_boxes), "type": list(defect_type)})
        return [float(parse_answer(c[0]["content"]).verdict == v) for c, v in zip(completions, verdict)]

    model, processor = build_tiny("qwen2_5_vl")
    args = _trl_args(GRPOConfig, tmp_path, num_generations=2, max_completion_length=8)
    trainer = GRPOTrainer(
        model=model, args=args, reward_funcs=[verdict_reward], train_dataset=train, processing_class=processor
    )
    assert trainer.train().global_step == 1
    assert seen, "the reward function was never called"
    assert set(seen[0]["verdict"]) <= set(train["verdict"])
    assert all(isinstance(b, list) for b in seen[0]["boxes"])
