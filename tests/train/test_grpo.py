"""GRPO stage: a tiny run of configs/grpo_tiny.yaml saves what the assistant loads; bad input fails early."""

import json
import math
from pathlib import Path

import pytest
import torch

from anomaly_assistant.assistant import AnomalyAssistant
from anomaly_assistant.commands.config import UsageError, parse_config
from anomaly_assistant.finding import Finding
from anomaly_assistant.modeling import tiny_anomaly_model
from anomaly_assistant.processing import placeholder_token_ids
from anomaly_assistant.train.common import InputError
from anomaly_assistant.train.distributed import read_digests, trainable_digest
from anomaly_assistant.train.grpo import (
    GrpoStageConfig,
    reward_columns,
    run,
)
from anomaly_assistant.train.rewards import RewardConfig, reward_functions

CONFIG = Path(__file__).parents[2] / "configs" / "grpo_tiny.yaml"


def config(data, out, *flags):
    argv = ["--config", str(CONFIG), "--data", str(data), "--output-dir", str(out), *flags]
    return parse_config(GrpoStageConfig, argv, prog="anomaly-assistant train grpo")


@pytest.fixture(scope="module")
def tiny_run(data_build, tmp_path_factory):
    """Two GRPO steps of the tiny model.

    16 random tokens are 30-50 characters: a 24-character budget makes their length rewards differ, so groups
    carry signal. The terms that may be None are off, so the logged total is the weighted sum of the means.
    """
    out = tmp_path_factory.mktemp("grpo_run")
    cfg = config(data_build, out, "--rewards-max-chars", "24", "--rewards-localization", "0",
                 "--rewards-defect-type", "0")
    final = run(cfg)
    return cfg, out, final


def test_a_grpo_run_saves_a_model_the_assistant_loads_and_inspects_with(tiny_run, grpo_train):
    cfg, out, final = tiny_run
    assert final == out / "final" and (final / "config.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    trained = AnomalyAssistant.from_pretrained(str(final))
    start, _ = tiny_anomaly_model("qwen2_5_vl", seed=cfg.seed)
    before, after = start.state_dict(), trained.model.state_dict()
    changed = [k for k in before if "language_model" in k and not torch.equal(before[k], after[k])]
    assert changed, "GRPO left the language model unchanged"
    assert not any("expert" in k and not torch.equal(before[k], after[k]) for k in before)  # expert frozen
    finding = trained.chat().inspect(grpo_train[0]["image"], max_new_tokens=8)
    assert isinstance(finding, Finding) and finding.verdict in ("normal", "anomalous")


def test_the_mean_total_reward_and_the_verdict_rates_are_logged(tiny_run):
    cfg, out, _ = tiny_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward" in line]
    assert [line["step"] for line in steps] == [1, 2]
    funcs, weights = reward_functions(cfg.rewards)
    names = [getattr(f, "func", f).__name__ for f in funcs]
    for line in steps:
        total = sum(w * line[f"rewards/{name}/mean"] for name, w in zip(names, weights))
        assert math.isfinite(line["reward"]) and line["reward"] == pytest.approx(total, abs=1e-5)
        assert 0.0 <= line["verdict/accuracy"] <= 1.0
        assert "verdict/miss_rate" in line or "verdict/false_alarm_rate" in line
        assert line["frac_groups_dropped"] == pytest.approx(line["frac_reward_zero_std"])
    assert any(line["frac_groups_dropped"] < 1.0 for line in steps)  # some groups carried signal


# ------------------------------------------------------------------------------------------ bad input


def test_config_errors_are_usage_errors(data_build, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text() + "num_generation: 3\n")
    with pytest.raises(UsageError, match="unknown key 'num_generation'"):
        parse_config(GrpoStageConfig, ["--config", str(bad)], prog="grpo")
    with pytest.raises(UsageError, match="multiple of --num-generations"):
        config(data_build, tmp_path, "--batch-size", "3")
    terms = ("format", "verdict", "localization", "defect-type", "consistency", "length", "repetition")
    off = [f"--rewards-{term}=0" for term in terms]
    with pytest.raises(UsageError, match="nothing to optimise"):
        config(data_build, tmp_path, *off)
    with pytest.raises(UsageError, match="unrecognized arguments: --rewards-speed"):
        parse_config(GrpoStageConfig, ["--config", str(CONFIG), "--rewards-speed", "1"], prog="grpo")
    bad.write_text(CONFIG.read_text().replace("  max_chars: 1500", "  max_char: 1500"))
    with pytest.raises(UsageError, match="unknown key 'rewards_max_char'"):
        parse_config(GrpoStageConfig, ["--config", str(bad)], prog="grpo")


@pytest.mark.parametrize("damage, error, message", [
    ("drop_column", InputError, "lacks column 'solution_boxes'"),
    ("no_data", InputError, "does not exist"),
    ("other_frame", InputError, "rebuild the data with `data build --backbone llava"),
    ("lora_target", UsageError, "matches no linear layer"),
])
def test_bad_input_fails_before_any_step(data_build, grpo_train, tmp_path, damage, error, message):
    data, flags = data_build, []
    if damage == "drop_column":
        data = tmp_path / "export"
        grpo_train.remove_columns("solution_boxes").save_to_disk(str(data))
    elif damage == "no_data":
        data = tmp_path / "never_built"
    elif damage == "other_frame":  # boxes written for Qwen2.5-VL's resize, rewarded on a LLaVA model
        flags = ["--model", "tiny:llava"]
    else:
        flags = ["--lora-targets", "no_such_layer"]
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run(config(data, out, *flags))
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


# ------------------------------------------------------------------------------------------ pieces


def test_reward_columns_are_the_export_columns_the_enabled_rewards_read(grpo_train):
    funcs, _ = reward_functions(RewardConfig())
    assert set(reward_columns(funcs)) == {"gt_label", "solution_boxes", "frame", "defect_type"}
    assert set(reward_columns(funcs)) <= set(grpo_train.column_names)
    funcs, _ = reward_functions(RewardConfig(localization=0, defect_type=0))
    assert set(reward_columns(funcs)) == {"gt_label"}


def test_sampling_never_emits_image_or_anomaly_placeholders():
    model, processor = tiny_anomaly_model("llava")
    tok = processor.tokenizer
    banned = set(placeholder_token_ids(tok, model))
    placeholders = ("<image>", "<|anomaly_pad|>", "<|anomaly_start|>", "<|anomaly_level|>")
    assert {tok.convert_tokens_to_ids(t) for t in placeholders} <= banned
    assert tok.eos_token_id not in banned and tok.pad_token_id not in banned


def test_a_killed_run_resumes_from_its_last_checkpoint(data_build, tmp_path):
    """Step 1 is saved, the run stops; `--resume` continues at step 2 and the metrics read as one run."""
    out = tmp_path / "run"
    run(config(data_build, out, "--max-steps", "1"))
    first = (out / "metrics.jsonl").read_text().splitlines()
    run(config(data_build, out, "--max-steps", "2", "--resume"))
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == first[0]  # step 1 was not run again (its step_time would differ)
    assert [json.loads(line)["step"] for line in lines if '"reward"' in line] == [1, 2]


@pytest.mark.parametrize("drop", [True, False])
def test_groups_whose_rewards_are_all_equal_leave_the_loss(grpo_train, tmp_path, drop):
    """A normal image whose completions all earn 1.0 is masked out of the loss and its token count; the
    anomalous image's group, whose completions differ, stays. `keep` leaves both (TRL's own handling)."""
    from trl import GRPOConfig

    from anomaly_assistant.train.grpo import GroupFilteringGRPOTrainer

    def label_reward(completions, gt_label, **kwargs):
        """Normal images: 1.0 for every completion; anomalous ones: 0.0, 1.0, 0.0, ... (a signal)."""
        return [1.0 if not y else float(i % 2) for i, y in enumerate(gt_label)]

    rows = [grpo_train[grpo_train["gt_label"].index(label)] for label in (0, 1)]
    model, processor = tiny_anomaly_model("qwen2_5_vl")
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, use_cpu=True, report_to=[], save_strategy="no")
    trainer = GroupFilteringGRPOTrainer(model=model, args=args, reward_funcs=[label_reward],
                                        train_dataset=grpo_train, processing_class=processor,
                                        drop_zero_signal=drop)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([rows[0], rows[0], rows[1], rows[1]])
    kept = batch["completion_mask"].sum(dim=1)  # tokens per completion that enter the loss
    assert (kept[:2] == 0).all() == drop and (kept[2:] > 0).all()
    assert int(batch["num_items_in_batch"]) == int(kept.sum())


def launch_two(*args: str) -> None:
    """`accelerate launch --num_processes 2` on CPU (gloo) of `anomaly-assistant train ...`."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         "29533", "-m", "anomaly_assistant.cli", "train", *args, "--device", "cpu"],
        env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_ranks_agree(out: Path, steps: int) -> None:
    digests = read_digests(out)
    assert [d["rank"] for d in digests] == [0, 1] and {d["step"] for d in digests} == {steps}
    assert digests[0]["trainable"] > 0 and digests[0]["sha256"] == digests[1]["sha256"]


@pytest.mark.slow
def test_two_processes_train_sft_then_grpo_and_both_ranks_agree(data_build, tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo): SFT steps, then a GRPO step from SFT's model.

    Each rank writes a digest of its final trainable weights and they agree; GRPO gathers both ranks' rewards
    before groups are judged, one metrics line per step, one final model that loads.
    """
    sft_out, out = tmp_path / "sft", tmp_path / "two"
    launch_two("sft", "--config", str(CONFIG.with_name("sft_tiny.yaml")), "--data", str(data_build),
               "--output-dir", str(sft_out), "--max-steps", "2", "--max-samples", "8", "--no-progress",
               "--no-resume")
    assert_ranks_agree(sft_out, 2)
    launch_two("grpo", "--config", str(CONFIG), "--model", str(sft_out / "final"), "--data", str(data_build),
               "--output-dir", str(out), "--max-steps", "1", "--rewards-max-chars", "24")
    assert_ranks_agree(out, 1)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in steps if "reward" in line]
    assert len(steps) == 1
    assert steps[0]["frac_groups_dropped"] == pytest.approx(steps[0]["frac_reward_zero_std"])
    assert steps[0]["num_tokens"] > 0 and math.isfinite(steps[0]["reward"])
    assert AnomalyAssistant.from_pretrained(str(out / "final")).model is not None


def test_the_weights_digest_sees_one_trainable_bit_and_ignores_frozen_weights():
    model, _ = tiny_anomaly_model("qwen2_5_vl")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.language_model"))
    before, count = trainable_digest(model)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        model.model.expert.ltfm.descriptors.add_(1.0)  # frozen
        assert trainable_digest(model)[0] == before
        weight = model.model.language_model.norm.weight
        weight[0] = torch.nextafter(weight[0], torch.tensor(2.0))  # one ulp of one trainable weight
    assert trainable_digest(model)[0] != before


def test_measure_scores_a_checkpoint_on_the_product_path(tiny_run, data_build):
    from anomaly_assistant.train.pipeline import measure

    _, _, final = tiny_run
    report = measure(str(final), str(data_build), split="train", limit=3, max_new_tokens=8)
    assert report["n"] == 3 and math.isfinite(report["reward"]) and len(report["reward_totals"]) == 3
    assert {"format", "verdict", "localization", "verdict/accuracy"} <= set(report["rewards"])
    assert 0.0 <= report["parse_rate"] <= 1.0


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_one_grpo_step_on_the_other_families(data_build, tmp_path, family):
    """The export's boxes are in Qwen's frame, so localization is off (the frame check would refuse it)."""
    out = tmp_path / family
    flags = ["--model", f"tiny:{family}", "--max-steps", "1", "--rewards-localization", "0"]
    final = run(config(data_build, out, *flags))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "reward" in line] == [1]
    assert AnomalyAssistant.from_pretrained(str(final)).model.config.model_type == f"anomaly_{family}"
