"""Stage 2, supervised fine-tuning: TRL's `SFTTrainer` on the SFT export of `data build`.

The rows are conversations in the answer grammar (inspection turns, multi-turn follow-ups) with their image,
in TRL's `messages` format (loss on assistant turns only, through the chat template's generation markers) or
its `prompt` / `completion` format (loss on the completion). The anomaly expert runs inside every forward and
stays frozen; what else trains is `StageConfig.tuning` / `trainable` (see `train.common`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from anomaly_assistant.commands.config import resolve_device
from anomaly_assistant.lookup import assistant_texts
from anomaly_assistant.train.common import (
    JsonlMetricsCallback,
    StageConfig,
    float32_whole_modules,
    load_export,
    load_model,
    prepare_trainable,
    quiet_console,
    resume_checkpoint,
    save_final,
    seed_everything,
    trainer_arguments,
)
from anomaly_assistant.train.distributed import WeightsDigestCallback

# The columns each SFT export format needs (data_builders.export.sft_row writes them).
FORMAT_COLUMNS = {"messages": ("images", "messages"), "prompt_completion": ("images", "prompt", "completion")}


@dataclass(kw_only=True)
class SftStageConfig(StageConfig):
    """Stage 2 (SFT) settings: the shared stage options plus the export format."""

    format: str = field(default="messages", metadata={
        "help": "columns of the SFT export (`data build --sft-format`): messages (loss on assistant turns) "
                "or prompt_completion (loss on the completion)", "choices": tuple(FORMAT_COLUMNS)})


def run(config: SftStageConfig) -> Path:
    """Train, checkpoint every `save_steps` (resumable), and save the final model; returns its folder.

    Input and settings are checked before the first step: the dataset's columns and image files, the device,
    the LoRA targets.
    """
    from trl import SFTConfig, SFTTrainer

    device = resolve_device(config.device)
    seed_everything(config.seed)
    dataset = load_export(config.data, "sft", config.split, FORMAT_COLUMNS[config.format], config.max_samples)
    loaded = load_model(config, device)
    model = prepare_trainable(loaded.model, config)
    resume = resume_checkpoint(config)
    args = SFTConfig(**trainer_arguments(config, device), max_length=None,
                     assistant_only_loss=config.format == "messages")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=loaded.processor,
                         callbacks=[JsonlMetricsCallback(config.output_dir, resume), WeightsDigestCallback()])
    if config.tuning == "qlora":
        float32_whole_modules(trainer.model)
    quiet_console(trainer)
    trainer.train(resume_from_checkpoint=resume)
    turns = dataset["messages"] if config.format == "messages" else dataset["completion"]
    return save_final(trainer.model, loaded, config, answers=assistant_texts(turns))
