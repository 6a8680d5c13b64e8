"""Stage 2 (SFT) on a tiny model and a real `data build` export: save, reload, resume, QLoRA, bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_assistant.commands.config import UsageError
from anomaly_assistant.finding import Finding
from anomaly_assistant.train.common import (
    InputError,
    StageConfig,
    check_image_files,
    load_model,
    lora_target_regex,
    part_of,
)
from anomaly_assistant.train.sft import SftStageConfig, run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads wait on each other (10x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(data, out, **overrides) -> SftStageConfig:
    settings = dict(model="tiny:qwen2_5_vl", data=str(data), output_dir=str(out), max_samples=4, batch_size=2,
                    learning_rate=5e-3, lr_scheduler="constant", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    gradient_checkpointing=False, progress=False, device="cpu")
    return SftStageConfig(**(settings | overrides))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in _metrics(out) if "loss" in m}


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def interrupted_run(data_build, tmp_path_factory):
    """Two steps with a checkpoint after each (merged save, copied aside), then a resumed run to step 4 that
    keeps the adapter: what a user gets after a kill and a restart."""
    out = tmp_path_factory.mktemp("sft_resumed")
    run(_config(data_build, out, max_steps=2, save_steps=1))
    merged = out.parent / "sft_merged_final"
    shutil.copytree(out / "final", merged)
    final = run(_config(data_build, out, max_steps=4, save_steps=1, resume=True, merge_lora=False))
    return out, merged, final


def test_resume_continues_the_step_counter_and_the_loss_curve(interrupted_run, data_build, tmp_path):
    out, _, _ = interrupted_run
    steps = [m["step"] for m in _metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    # The same four steps without a break (same seed): same data order, same updates, same losses.
    straight = tmp_path / "straight"
    run(_config(data_build, straight, max_steps=4, save_steps=100))
    assert _losses(straight) == pytest.approx(_losses(out), rel=1e-5)


def test_merged_and_adapter_saves_reload_and_inspect(interrupted_run):
    from transformers import AutoModelForImageTextToText

    from anomaly_assistant.assistant import AnomalyAssistant
    from anomaly_assistant.modeling import tiny_anomaly_model

    _, merged, adapter = interrupted_run
    assert not (merged / "adapter_config.json").exists()
    assert (adapter / "adapter_config.json").exists() and (adapter / "model.safetensors").exists()
    initial, _ = tiny_anomaly_model("qwen2_5_vl")
    merged_model = AutoModelForImageTextToText.from_pretrained(merged)
    assert type(merged_model).__name__ == "AnomalyQwen2_5_VLForConditionalGeneration"
    trained, before = merged_model.state_dict(), initial.state_dict()
    changed = {n.split(".")[1] + (".merger" if ".merger." in n else "")
               for n in before if not torch.equal(before[n], trained[n])}
    assert changed == {"language_model", "visual.merger"}  # LoRA merged into the LLM, the projector trained
    for folder in (merged, adapter):
        assistant = AnomalyAssistant.from_pretrained(str(folder))
        finding = assistant.chat().inspect(_image(), max_new_tokens=8)
        assert isinstance(finding, Finding) and finding.image_size == (64, 64)
        # the training answers to draft from at decoding travel with the checkpoint (anomaly_assistant.lookup)
        answers = json.loads((folder / "lookup_corpus.json").read_text())["answers"]
        assert answers == sorted(set(answers)) and any(a.startswith("<think>") and "</answer>" in a
                                                          for a in answers), answers[:1]
        assert assistant.model.lookup_corpus is not None and len(assistant.model.lookup_corpus) > len(answers)
    assert getattr(assistant.model, "peft_config", None), "the kept adapter was not loaded"


@pytest.mark.parametrize("merge_lora", [True, False], ids=["merged", "adapter"])
def test_qlora_loads_4bit_trains_one_step_and_saves_full_precision(merge_lora, data_build, tmp_path):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from anomaly_assistant.assistant import AnomalyAssistant

    config = _config(data_build, tmp_path, tuning="qlora", max_steps=1, save_steps=100, merge_lora=merge_lora)
    quantized = load_model(config, "cpu").model
    kinds = {name.split(".")[1]: type(module) for name, module in quantized.named_modules()
             if name.endswith("q_proj") or name.endswith("qkv")}
    assert kinds == {"language_model": Linear4bit, "visual": torch.nn.Linear, "expert": torch.nn.Linear}
    del quantized
    final = run(config)
    base = load_file(tmp_path / "anomaly-base" / "model.safetensors")
    saved = load_file(final / "model.safetensors")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert saved[name].dtype == torch.float32  # never the 4-bit weights
    assert torch.equal(saved[name], base[name]) != merge_lora  # merged in, or base kept beside the adapter
    assert (final / "adapter_config.json").exists() != merge_lora
    trained = AutoModelForImageTextToText.from_pretrained(final)
    assert bool(getattr(trained, "peft_config", None)) != merge_lora
    assert isinstance(AnomalyAssistant.from_pretrained(str(final)).chat().inspect(_image(), max_new_tokens=4),
                      Finding)


def test_full_fine_tuning_trains_only_the_chosen_parts(data_build, tmp_path):
    from transformers import AutoModelForImageTextToText

    from anomaly_assistant.modeling import tiny_anomaly_model

    final = run(_config(data_build, tmp_path, tuning="full", trainable=["projector"], max_steps=1))
    trained = AutoModelForImageTextToText.from_pretrained(final).state_dict()
    initial = tiny_anomaly_model("qwen2_5_vl")[0].state_dict()
    changed = {name.split(".")[1] + (".merger" if ".merger." in name else "")
               for name in initial if not torch.equal(initial[name], trained[name])}
    assert changed == {"visual.merger"}  # not the LLM, not the rest of the tower, never the expert


def test_bad_input_fails_before_any_step(data_build, tmp_path):

    with pytest.raises(InputError, match="lacks column 'prompt'"):
        run(_config(data_build, tmp_path / "a", format="prompt_completion"))
    with pytest.raises(UsageError, match="matches no linear layer"):
        run(_config(data_build, tmp_path / "b", lora_targets=["not_a_layer"]))
    with pytest.raises(InputError, match="does not exist"):
        run(_config(tmp_path / "missing", tmp_path / "c"))
    assert not list(tmp_path.glob("*/checkpoint-*"))


def test_an_image_stored_as_a_path_that_left_is_named(data_build, tmp_path):
    """`save_to_disk` embeds image bytes, but a dataset written as Arrow files (or by older `datasets`) keeps
    paths: the check reads the stored values without decoding and names the first missing file."""
    import datasets

    messages = datasets.load_from_disk(str(data_build / "sft"))["train"][0]["messages"]
    text = datasets.Value("string")
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "messages": [{"role": text, "content": text}]})
    here, gone = tmp_path / "here.png", tmp_path / "moved_away.png"
    _image().save(here)
    rows = {"images": [[{"path": str(here), "bytes": None}], [{"path": str(gone), "bytes": None}]],
            "messages": [messages, messages]}
    dataset = datasets.Dataset.from_dict(rows, features=features)
    check_image_files(dataset.select([0]), "rows")
    with pytest.raises(InputError, match=f"row 1, column 'images': image file {gone} does not exist"):
        check_image_files(dataset, "rows")


def test_lora_targets_are_scoped_to_the_part_they_adapt():
    llm_only = lora_target_regex(StageConfig(model="m", data="d", output_dir="o", lora_targets=["gate_proj"]))
    vision_mlp, llm_mlp = "model.visual.blocks.0.mlp.gate_proj", "model.language_model.layers.0.mlp.gate_proj"
    assert re.fullmatch(llm_only, llm_mlp) and not re.fullmatch(llm_only, vision_mlp)
    assert part_of("model.visual.merger.mlp.0") == "projector" and part_of(vision_mlp) == "vision"
    assert part_of("model.expert.ltfm.x") == "expert" and part_of("lm_head") == "llm"
    with pytest.raises(UsageError, match="--tuning full"):
        lora_target_regex(StageConfig(model="m", data="d", output_dir="o", trainable=["projector"]))


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_every_family_trains_its_llm_and_projector(family, data_build, tmp_path):
    from transformers import AutoModelForImageTextToText

    from anomaly_assistant.assistant import AnomalyAssistant
    from anomaly_assistant.modeling import tiny_anomaly_model

    final = run(_config(data_build, tmp_path, model=f"tiny:{family}", max_steps=1, max_samples=2))
    trained = AutoModelForImageTextToText.from_pretrained(final).state_dict()
    initial = tiny_anomaly_model(family)[0].state_dict()
    changed = {name.split(".")[1] for name in initial if not torch.equal(initial[name], trained[name])}
    assert changed == {"language_model", "multi_modal_projector"}
    assert isinstance(AnomalyAssistant.from_pretrained(str(final)).chat().inspect(_image(), max_new_tokens=4),
                      Finding)


def test_lora_on_the_vision_tower_stays_inside_it():
    from anomaly_assistant.modeling import tiny_anomaly_model
    from anomaly_assistant.train.common import prepare_trainable

    model, _ = tiny_anomaly_model("llava")
    config = StageConfig(model="tiny:llava", data="d", output_dir="o", trainable=["vision"])
    adapted = {name.removeprefix("base_model.model.").split(".lora_A")[0]
               for name, _ in prepare_trainable(model, config).named_parameters() if ".lora_A." in name}
    assert adapted and all(name.startswith("model.vision_tower.") for name in adapted)
    assert {name.rsplit(".", 1)[1] for name in adapted} == {"q_proj", "k_proj", "v_proj"}


def test_prompt_completion_export_trains_on_the_completion(data_build, tmp_path):
    import datasets

    messages = datasets.load_from_disk(str(data_build / "sft"))
    split = messages.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                         remove_columns=["messages"])
    split.save_to_disk(str(tmp_path / "sft"))
    out = tmp_path / "run"
    final = run(_config(tmp_path, out, format="prompt_completion", max_steps=2))
    completions = {m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
                   for row in split["train"].select(range(4))["completion"] for m in row}
    assert set(json.loads((final / "lookup_corpus.json").read_text())["answers"]) == completions
    losses = _losses(out)
    assert list(losses) == [1, 2] and all(0 < loss < 20 for loss in losses.values())


def test_only_tiny_and_tiny_family_name_the_built_in_model():
    from anomaly_assistant.train.common import is_tiny

    assert is_tiny("tiny") and is_tiny("tiny:llava")
    assert not is_tiny("tiny_run/final") and not is_tiny("runs/tiny")


def test_metrics_logged_after_the_resumed_checkpoint_are_dropped(tmp_path):
    from anomaly_assistant.train.common import JsonlMetricsCallback

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    lines = [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)]  # step 3 ran, then the run was killed
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    JsonlMetricsCallback(tmp_path, resume_from=str(checkpoint))
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    JsonlMetricsCallback(tmp_path, resume_from=None)  # a fresh run starts a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.slow
def test_a_killed_run_resumes_where_its_last_checkpoint_left(data_build, tmp_path):
    """SIGKILL once a checkpoint exists, rerun the same command: steps 1-N logged once each, the same losses
    as an unbroken run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "anomaly_assistant.cli", "train", "sft", "--model", "tiny:qwen2_5_vl",
               "--data", str(data_build), "--out", str(out), "--max-samples", "4", "--max-steps", "30",
               "--save-steps", "2", "--save-total-limit", "0", "--lr-scheduler", "constant",
               "--learning-rate", "5e-3", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
               "--no-gradient-checkpointing", "--device", "cpu", "--no-progress", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["step"] for m in _metrics(out) if "loss" in m] == list(range(1, 31))
    straight = tmp_path / "straight"
    run(_config(data_build, straight, max_steps=30, save_steps=100))
    assert _losses(straight) == pytest.approx(_losses(out), rel=1e-5)


def test_tensorboard_gets_the_logs_or_its_absence_stops_the_run_before_a_step(data_build, tmp_path):
    import importlib.util

    config = _config(data_build, tmp_path, max_steps=1, report_to=["tensorboard"])
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(RuntimeError, match="tensorboard"):
            run(config)
        assert not list(tmp_path.glob("checkpoint-*"))
    else:
        run(config)
        assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
