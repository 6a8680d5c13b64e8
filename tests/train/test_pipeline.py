"""`train pipeline`: configs/pipeline_tiny.yaml chains data build -> expert -> SFT -> GRPO in one folder."""

import json
import time
from pathlib import Path

import pytest
import torch

from anomaly_assistant import cli
from anomaly_assistant.assistant import AnomalyAssistant
from anomaly_assistant.commands.config import parse_config
from anomaly_assistant.expert import AnomalyExpert
from anomaly_assistant.train.pipeline import PipelineConfig

CONFIG = Path(__file__).parents[2] / "configs" / "pipeline_tiny.yaml"
BUDGET_S = 300  # the limit for the tiny pipeline on this CPU


def run_pipeline(capsys, out: Path, *flags: str) -> tuple[str, float]:
    started = time.perf_counter()
    rc = cli.main(["train", "pipeline", "--config", str(CONFIG), "--out", str(out), *flags])
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return captured.out, seconds


def normal_and_anomalous(out: Path) -> tuple[list[str], str]:
    lines = (out / "data" / "records" / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    normals = [r["image_path"] for r in records if r["gt_label"] == 0]
    anomalous = next(r["image_path"] for r in records if r["gt_label"] == 1)
    return normals[:2], anomalous


def check_folder(out: Path, family: str) -> None:
    """Stages in their subfolders, each starting from the last; the final model loads; the card measures."""
    for part in ("data/summary.json", "expert/expert/expert.safetensors", "start/config.json",
                 "sft/final/config.json", "grpo/final/config.json", "config.json", "README.md"):
        assert (out / part).exists(), part
    sft_cfg = json.loads((out / "sft" / "final" / "training_config.json").read_text())
    grpo_cfg = json.loads((out / "grpo" / "final" / "training_config.json").read_text())
    assert sft_cfg["model"] == str(out / "start") and grpo_cfg["model"] == str(out / "sft" / "final")
    assistant = AnomalyAssistant.from_pretrained(str(out))
    assert assistant.model.config.model_type == f"anomaly_{family}"
    # the stage-1 expert went into the model and was trained again there on the backbone's v° (stage 1b);
    # it stayed frozen through SFT and GRPO, and SFT trained the projector (which makes v°), so stage 1b ran
    # again on the final model
    stage1 = AnomalyExpert.from_pretrained(out / "expert" / "expert").state_dict()
    start = AnomalyAssistant.from_pretrained(str(out / "start")).model.model.expert.state_dict()
    sft = AnomalyAssistant.from_pretrained(str(out / "sft" / "final")).model.model.expert.state_dict()
    ours = assistant.model.model.expert.state_dict()
    report = json.loads((out / "start" / "expert_transfer.json").read_text())
    assert any(name.startswith("ltfm.adapters") for name in report["copied"])
    assert report["kept"] and report["adapted"]["steps"] > 0
    assert any(not torch.equal(start[name], stage1[name]) for name in report["copied"])
    assert all(torch.equal(sft[name], start[name]) for name in sft)
    assert json.loads((out / "expert_adaptation.json").read_text())["steps"] > 0
    assert any(not torch.equal(ours[name], start[name]) for name in ours)
    assert assistant.model.model.expert.is_trained
    card = (out / "README.md").read_text()
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality) == {"untrained", "sft", "final"}
    assert all(q["n"] > 0 and 0.0 <= q["parse_rate"] <= 1.0 for q in quality.values())
    for name, q in quality.items():
        assert f"| {name} | {q['n']} | {q['parse_rate']:.3f} |" in card
        assert len(q["reward_totals"]) == q["n"]
    assert f"GRPO's gain in mean reward over SFT on these {quality['sft']['n']} answers" in card
    assert "## Data" in card and "SynthInspect" in card and "sft:" in card and "grpo:" in card
    assert "stage 1b" in card and "stage 1b again" in card


def test_qwen_pipeline_runs_in_budget_resumes_and_answers(capsys, tmp_path):
    out = tmp_path / "qwen"
    printed, seconds = run_pipeline(capsys, out, "--data-expert-synth", "40")
    assert seconds <= BUDGET_S, f"{seconds:.0f} s"
    assert f"saved {out}" in printed
    check_folder(out, "qwen2_5_vl")
    # the expert trained on its own, larger build (seed + 1, inspection rows only), SFT on the first
    expert_build = json.loads((out / "expert_data" / "summary.json").read_text())["config"]
    assert expert_build["synth"] == 40 and expert_build["seed"] == 1 and expert_build["kinds"] == ["inspect"]
    rows = len((out / "expert_data" / "records" / "train.jsonl").read_text().splitlines())
    first_epoch = json.loads((out / "expert" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_epoch["step"] == -(-rows // 8) and rows > 20  # batch_size 8 in pipeline_tiny.yaml
    assert "expert_data/" in (out / "README.md").read_text()
    # a rerun skips every finished stage and leaves the final model alone
    weights = (out / "model.safetensors").stat().st_mtime_ns
    printed, seconds = run_pipeline(capsys, out, "--data-expert-synth", "40")
    assert printed.count("skipped") == 6 and "stage 2: SFT is complete" in printed
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    # the product's command answers with the trained folder and reference images
    normals, image = normal_and_anomalous(out)
    rc = cli.main(["inspect", image, "--model", str(out), "--references", *normals, "--json",
                   "--max-new-tokens", "24"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    answer = json.loads(next(line for line in captured.out.splitlines() if line.startswith("{")))
    assert answer["verdict"] in ("normal", "anomalous") and answer["raw_text"]


def test_a_killed_stage_resumes_and_finished_stages_are_skipped(capsys, tmp_path):
    """Remove GRPO's final folder (as a kill before its save would leave it): only GRPO and the card rerun."""
    import shutil

    out = tmp_path / "resume"
    run_pipeline(capsys, out, "--skip-expert", "--data-synth", "12", "--sft-max-steps", "2",
                 "--eval-limit", "1", "--eval-max-new-tokens", "4")
    shutil.rmtree(out / "grpo" / "final")
    (out / "README.md").unlink()
    sft_weights = (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    printed, _ = run_pipeline(capsys, out, "--skip-expert", "--data-synth", "12", "--sft-max-steps", "2",
                              "--eval-limit", "1", "--eval-max-new-tokens", "4")
    assert "stage 2: SFT is complete, skipped" in printed and "stage 3: GRPO\n" in printed
    assert (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_weights
    assert (out / "README.md").is_file()
    assert not AnomalyAssistant.from_pretrained(str(out)).model.model.expert.is_trained  # skip_expert


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_the_other_families_run_the_pipeline_in_budget(family, capsys, tmp_path):
    out = tmp_path / family
    _, seconds = run_pipeline(capsys, out, "--model", f"tiny:{family}")
    assert seconds <= BUDGET_S, f"{seconds:.0f} s"
    check_folder(out, family)


def test_the_yaml_has_a_section_per_stage_and_flags_reach_them():
    flags = ["--sft-max-steps", "7", "--grpo-rewards-verdict", "2"]
    cfg = parse_config(PipelineConfig, ["--config", str(CONFIG), *flags], "test")
    assert cfg.sft.max_steps == 7 and cfg.grpo.rewards.verdict == 2.0 and cfg.expert.epochs == 1
    assert cfg.data.synth > 0 and cfg.grpo.num_generations == 2
    with pytest.raises(Exception, match="sft-output-dir"):  # the pipeline links the stages itself
        parse_config(PipelineConfig, ["--config", str(CONFIG), "--sft-output-dir", "x"], "test")
