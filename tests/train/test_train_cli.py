"""`anomaly-assistant train {sft,grpo}`: a tiny run from the shipped config; one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anomaly_assistant.cli import main as top_main
from anomaly_assistant.train.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SFT_TINY = CONFIGS / "sft_tiny.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads wait on each other (10x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_train_is_listed_with_its_stages(capsys):
    assert top_main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert top_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "grpo" in out
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora-targets" in out and "--merge-lora, --no-merge-lora" in out and "--resume" in out
    assert main(["grpo", "--help"]) == 0
    assert "--num-generations" in capsys.readouterr().out


def test_sft_from_the_shipped_tiny_config(data_build, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["sft", "--config", str(SFT_TINY), "--data", str(data_build), "--out", str(out),
                 "--max-steps", "2", "--save-steps", "1", "--max-samples", "4", "--logging-steps", "1",
                 "--no-progress", "-q"])
    assert code == 0
    assert capsys.readouterr().out == f"saved {out / 'final'}\n"  # -q: the result only, no trainer log lines
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]
    saved = json.loads((out / "final" / "training_config.json").read_text())
    assert saved["model"] == "tiny:qwen2_5_vl" and saved["max_steps"] == 2  # the YAML, then the flags


def test_usage_errors_exit_2_with_one_line(data_build, tmp_path, capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown stage 'frobnicate'" in _error_line(capsys)
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(SFT_TINY.read_text() + "lora_rank: 4\n")
    assert main(["sft", "--config", str(bad_key)]) == 2
    assert "unknown key 'lora_rank'" in _error_line(capsys)
    assert main(["sft", "--config", str(SFT_TINY), "--tuning", "int3"]) == 2
    assert "int3" in _error_line(capsys)
    args = ["sft", "--config", str(SFT_TINY), "--data", str(data_build), "--out", str(tmp_path / "lora")]
    assert main([*args, "--lora-targets", "qkv_proj"]) == 2
    line = _error_line(capsys)
    assert line.startswith("anomaly-assistant train sft: LoRA target") and "matches no linear layer" in line
    assert not list((tmp_path / "lora").glob("checkpoint-*"))


def test_input_errors_exit_1_with_one_line(data_build, tmp_path, capsys):
    args = ["sft", "--config", str(SFT_TINY), "--out", str(tmp_path / "out")]
    assert main([*args, "--data", str(tmp_path / "nowhere")]) == 1
    line = _error_line(capsys)
    assert line.startswith("anomaly-assistant train sft: ")
    assert line.endswith(f"dataset folder {tmp_path / 'nowhere'} does not exist")
    assert main([*args, "--data", str(data_build), "--format", "prompt_completion"]) == 1
    assert "lacks column 'prompt'" in _error_line(capsys)
    assert main([*args, "--data", str(data_build), "--model", str(tmp_path / "no_model")]) == 1
    assert "--model" in _error_line(capsys)


@pytest.mark.slow
def test_two_processes_split_the_data_and_rank_0_saves(data_build, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): a step sees both ranks' rows; logs and saves happen once.

    (accelerate launches several CPU processes on one machine only through mpirun; torchrun needs nothing.)
    """
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "anomaly_assistant.cli", "train", "sft", "--config", str(SFT_TINY),
               "--data", str(data_build), "--out", str(out),
               "--max-steps", "2", "--save-steps", "1", "--max-samples", "4", "--logging-steps", "1",
               "--no-progress", "--no-resume"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f"saved {out / 'final'}") == 2  # both ranks returned, after rank 0 saved
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0  # 4 rows, 2 per rank and step: one epoch per step
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two steps and the summary, written by rank 0 only
    from anomaly_assistant.assistant import AnomalyAssistant

    assert AnomalyAssistant.from_pretrained(str(out / "final")).has_llm


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_stage_config_parses(path):
    """Each `configs/<stage>_*.yaml` reads with its stage's config class (no unknown key, valid choices)."""
    import importlib

    from anomaly_assistant.commands.config import parse_config
    from anomaly_assistant.train.cli import STAGES

    module_name, class_name, _ = STAGES[path.name.split("_")[0]]
    config_class = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(parse_config(config_class, ["--config", str(path)], "test"), config_class)


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    assert ClusterConfig.from_yaml_file(str(path)).num_processes >= 1
