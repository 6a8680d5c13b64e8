"""What every training stage (SFT, GRPO) shares: settings, model, adapters, data checks, logging, saving.

A stage config (`SftStageConfig`, `GrpoStageConfig`) subclasses `StageConfig`, so every stage reads the same
options by the same names. A stage's `run(config)` calls, in order:

1. `seed_everything(config.seed)`;
2. `load_export(...)`: the `data build` export, checked (columns, image files) before any model loads;
3. `load_model(config)`: an anomaly checkpoint folder, a plain Qwen2.5-VL / LLaVA-OneVision / LLaVA checkpoint
   (wrapped with a new expert) or `tiny:<family>`; 4-bit (bitsandbytes NF4) for QLoRA;
4. `prepare_trainable(model, config)`: LoRA / QLoRA through PEFT, or full fine-tuning of the chosen parts; the
   expert is always frozen;
5. the TRL trainer with `trainer_arguments(config)`, `JsonlMetricsCallback` and `resume_checkpoint(config)`;
6. `save_final(...)`: `save_pretrained` of the whole anomaly model + processor, LoRA merged or kept as an
   adapter beside it. Both reload with `AnomalyAssistant.from_pretrained(dir)` and
   `AutoModelForImageTextToText`.

Errors in the input (missing column, missing image file) raise `InputError` (exit 1); settings that cannot
work (a LoRA target that matches no module) raise `UsageError` (exit 2); both before the first step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from anomaly_assistant.commands import runtime
from anomaly_assistant.commands.config import DEVICE_HELP, UsageError

PARTS = ("llm", "projector", "vision")

# Module name prefixes of each part, for every family (Qwen2.5-VL: `visual` with its `merger`; LLaVA and
# LLaVA-OneVision: `vision_tower` and `multi_modal_projector`). The projector sits inside Qwen's vision tower,
# so `part_of` asks for the projector before the vision tower.
PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "expert": ("model.expert",),
    "projector": ("model.visual.merger", "model.multi_modal_projector"),
    "vision": ("model.visual", "model.vision_tower"),
    "llm": ("model.language_model", "lm_head"),
}
# PEFT's `modules_to_save` names (matched as name suffixes): the projector trains whole next to the adapters.
PROJECTOR_MODULES = ("merger", "multi_modal_projector")
# Scopes of the LoRA target regex: vision MLP and LLM MLP layers share names (gate_proj, ...), so targets are
# always anchored to the part they adapt.
LORA_SCOPES = {"llm": r"model\.language_model", "vision": r"model\.(?:visual|vision_tower)"}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The full-precision starting checkpoint QLoRA writes: quantized from at the start, merged into at the end.
BASE_DIR_NAME = "anomaly-base"
METRICS_FILE = "metrics.jsonl"


class InputError(runtime.InputError):
    """Input that cannot be used (dataset folder, column, image file); the message names it (exit 1)."""


@dataclass(kw_only=True)
class StageConfig:
    """Options every training stage shares (YAML keys = these field names; flags override them)."""

    model: str = field(metadata={"help": "anomaly checkpoint folder, plain Qwen2.5-VL / LLaVA-OneVision / "
                                         "LLaVA checkpoint (a new expert is added), or tiny:<family>"})
    data: str = field(metadata={"help": "a `data build` output folder, or its sft/ or grpo/ export folder"})
    output_dir: str = field(metadata={"help": "where checkpoints, metrics.jsonl and the final model go",
                                      "aliases": ["--out"]})
    split: str = field(default="train", metadata={"help": "dataset split to train on"})
    max_samples: int = field(default=0, metadata={"help": "use only the first N rows (0 = all)"})
    tuning: str = field(default="lora", metadata={
        "help": "lora (PEFT adapters), qlora (4-bit base via bitsandbytes + adapters) or full fine-tuning",
        "choices": ("lora", "qlora", "full")})
    trainable: list[str] = field(default_factory=lambda: ["llm", "projector"], metadata={
        "help": "parts that train: llm, projector, vision (the expert is always frozen; with LoRA, llm and "
                "vision get adapters and the projector trains whole)", "choices": PARTS})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={
        "help": "linear layer names that get adapters inside the trainable llm / vision parts"})
    lora_target_regex: str = field(default="", metadata={
        "help": "full-name regex of the adapted modules (replaces the one built from --trainable and "
                "--lora-targets)"})
    merge_lora: bool = field(default=True, metadata={
        "help": "merge the adapters into the saved model (--no-merge-lora keeps them as an adapter "
                "beside it)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps (-1: run --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when --max-steps is -1"})
    batch_size: int = field(default=2, metadata={"help": "rows per device and step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="linear", metadata={
        "help": "learning-rate schedule",
        "choices": ("linear", "cosine", "constant", "constant_with_warmup")})
    warmup: float = field(default=0.0, metadata={
        "help": "linear warm-up: steps (>= 1) or a fraction of all steps"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, adapters and data order"})
    save_steps: int = field(default=50, metadata={"help": "write a checkpoint every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (0 = all)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint in --output-dir (same step counter, data order, "
                "loss curve)"})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "recompute activations in the backward pass (less memory, about a third more time)"})
    logging_steps: int = field(default=1, metadata={"help": "log loss / lr every N steps"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "trackers that also get the logs, besides metrics.jsonl (tensorboard, wandb, ...; the "
                "package must be installed; tensorboard writes under <output-dir>/runs)"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch before the model and its adapters are built (CPU runs repeat exactly)."""
    from transformers import set_seed

    set_seed(seed)


# ------------------------------------------------------------------------------------------ data


def load_export(data: str, kind: str, split: str, columns: tuple[str, ...], max_samples: int = 0):
    """The `split` of a `data build` export as a `datasets.Dataset`, checked before training starts.

    `data` is a build output folder (its `<kind>/` export is used) or an export folder itself. Raises
    InputError naming the folder, the missing column, or the first image file that no longer exists.
    """
    import datasets

    root = Path(data)
    folder = root / kind if (root / kind).is_dir() else root
    if not folder.is_dir():
        raise InputError(f"dataset folder {data} does not exist")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{folder} is not a saved dataset (`data build` writes one): {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{folder} has no split {split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    missing = [c for c in columns if c not in loaded.column_names]
    if missing:
        have = ", ".join(loaded.column_names)
        raise InputError(f"{folder} ({split}) lacks column {missing[0]!r}; it has: {have}")
    if len(loaded) == 0:
        raise InputError(f"{folder} ({split}) has no rows")
    check_image_files(loaded, str(folder))
    if max_samples:
        loaded = loaded.select(range(min(max_samples, len(loaded))))
    return loaded


def check_image_files(dataset: Any, where: str) -> None:
    """Raise InputError for the first image stored only as a path whose file does not exist.

    Reads the memory-mapped Arrow columns (which images have no bytes, and their paths), never the image
    bytes: an export of many thousand embedded images is checked in milliseconds.
    """
    import datasets
    import pyarrow.compute as pc

    for name, feature in dataset.features.items():
        nested = isinstance(feature, datasets.List | datasets.Sequence)
        if not isinstance(feature.feature if nested else feature, datasets.Image):
            continue
        first_row = 0
        for chunk in dataset.data.column(name).chunks:
            images = chunk.flatten() if nested else chunk  # struct {bytes, path} per image
            rows = pc.list_parent_indices(chunk) if nested else None
            path_only = pc.and_(pc.is_null(images.field("bytes")), pc.is_valid(images.field("path")))
            for i in pc.indices_nonzero(path_only).to_pylist():
                path = images.field("path")[i].as_py()
                if not Path(path).exists():
                    row = first_row + (rows[i].as_py() if nested else i)
                    raise InputError(f"{where}: row {row}, column {name!r}: image file {path} does not exist")
            first_row += len(chunk)


# ------------------------------------------------------------------------------------------ model


@dataclass
class LoadedModel:
    """The model to train, its processor, and the full-precision checkpoint a 4-bit model came from."""

    model: Any
    processor: Any
    full_precision_dir: Path | None = None


def load_model(config: StageConfig, device: str) -> LoadedModel:
    """The anomaly model + processor named by `config.model`; 4-bit NF4 (LLM only) when `tuning` is qlora.

    A 4-bit model is loaded from an anomaly checkpoint folder: a plain backbone or a tiny model is first
    written (full precision, with its new expert) to `<output_dir>/anomaly-base/`, which also serves to merge
    the adapters at the end. The vision tower, projector, expert and LM head stay in full precision.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from anomaly_assistant import (
        default_model,
        modeling,  # noqa: F401  registers the anomaly classes with the Auto* classes
    )

    dtype = torch.float32 if device == "cpu" else "auto"
    source, is_anomaly_dir = default_model.resolve_source(config.model), False
    if not is_tiny(source):
        runtime.check_model_source(source)  # a hub id without network fails now, not after hub retries
        try:
            is_anomaly_dir = AutoConfig.from_pretrained(source).model_type.startswith("anomaly_")
        except (OSError, ValueError) as exc:
            raise InputError(f"--model {source}: not a checkpoint folder or hub id ({exc})") from exc
    if config.tuning == "qlora":
        if not is_anomaly_dir:
            base = Path(config.output_dir) / BASE_DIR_NAME
            if not (base / "config.json").is_file():
                model, processor = _load_full(source, is_anomaly_dir, dtype, config.seed)
                staging = base.with_name(f"{base.name}.{os.getpid()}")  # each process writes its own
                model.save_pretrained(staging)
                processor.save_pretrained(staging)
                del model
                try:
                    staging.rename(base)
                except OSError:  # another process of this launch renamed its identical copy first
                    shutil.rmtree(staging)
            source = str(base)
        # A 4-bit model cannot be moved after loading (the trainer leaves it where it is): load it on its GPU,
        # this process's one under a multi-process launch.
        device_map = None
        if device != "cpu":
            gpu = torch.device(device).index
            device_map = {"": gpu if gpu is not None else int(os.environ.get("LOCAL_RANK", 0))}
        model = AutoModelForImageTextToText.from_pretrained(
            source, quantization_config=quantization_config(device), dtype=dtype, device_map=device_map)
        return LoadedModel(model, AutoProcessor.from_pretrained(source), Path(source))
    model, processor = _load_full(source, is_anomaly_dir, dtype, config.seed)
    return LoadedModel(model, processor)


def is_tiny(source: str) -> bool:
    """`tiny` / `tiny:<family>`: a tiny random model built in code (a folder named `tiny_run` is a folder)."""
    return source == "tiny" or source.startswith("tiny:")


def _load_full(source: str, is_anomaly_dir: bool, dtype: Any, seed: int) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from anomaly_assistant import modeling

    if is_tiny(source):
        return modeling.tiny_anomaly_model(source.partition(":")[2] or "qwen2_5_vl", seed=seed)
    if is_anomaly_dir:
        return (AutoModelForImageTextToText.from_pretrained(source, dtype=dtype),
                AutoProcessor.from_pretrained(source))
    return modeling.load_backbone_as_anomaly(source, dtype=dtype)


def quantization_config(device: str) -> Any:
    """NF4 with double quantization for the language model only (bitsandbytes; runs on CPU too)."""
    import torch
    from transformers import BitsAndBytesConfig

    keep = [p for part in ("expert", "projector", "vision") for p in PART_PREFIXES[part]] + ["lm_head"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                              llm_int8_skip_modules=keep)


def part_of(name: str) -> str | None:
    """Which part (`expert`, `projector`, `vision`, `llm`) a parameter or module name belongs to."""
    for part in ("expert", "projector", "vision", "llm"):
        if any(name == p or name.startswith(p + ".") for p in PART_PREFIXES[part]):
            return part
    return None


def lora_target_regex(config: StageConfig) -> str:
    """Full-name regex of the adapted modules: `lora_targets` inside the trainable llm / vision parts."""
    if config.lora_target_regex:
        return config.lora_target_regex
    scopes = [LORA_SCOPES[p] for p in ("llm", "vision") if p in config.trainable]
    if not scopes:
        raise UsageError(f"--tuning {config.tuning} adapts the llm or vision parts; add one to --trainable "
                         "(or use --tuning full to train only the projector)")
    names = "|".join(re.escape(n) for n in config.lora_targets)
    return rf"(?:{'|'.join(scopes)})\..*\.(?:{names})"


def lora_config(model: Any, config: StageConfig) -> Any:
    """A PEFT `LoraConfig` from the settings; UsageError when the target regex matches no linear layer."""
    import torch
    from peft import LoraConfig

    pattern = lora_target_regex(config)
    compiled = re.compile(pattern)
    linear = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and part_of(n) != "expert"]
    if not any(compiled.fullmatch(n) for n in linear):
        example = next((n for n in linear if part_of(n) == "llm"), linear[0] if linear else "none")
        raise UsageError(f"LoRA target {pattern!r} matches no linear layer of the model (e.g. {example!r}); "
                         "check --lora-targets / --lora-target-regex")
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=pattern, task_type="CAUSAL_LM",
                      modules_to_save=list(PROJECTOR_MODULES) if "projector" in config.trainable else None)


def prepare_trainable(model: Any, config: StageConfig) -> Any:
    """The model with only the chosen parts trainable: a PEFT model (lora / qlora), else the model itself."""
    unknown = sorted(set(config.trainable) - set(PARTS))
    if unknown or not config.trainable:
        raise UsageError(f"--trainable {' '.join(config.trainable)}: choose from {', '.join(PARTS)}")
    if config.tuning == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(part_of(name) in config.trainable)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    peft_config = lora_config(model, config)
    if config.tuning == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config)


def float32_whole_modules(model: Any) -> None:
    """Undo TRL's bfloat16 cast of the projector copy that trains whole next to QLoRA adapters.

    With a 4-bit model TRL casts every trainable parameter to bfloat16 (the QLoRA recipe for the adapters);
    the adapters cast their input, but the projector (PEFT `modules_to_save`) is a plain layer and would meet
    float32 activations. Call it after building the trainer, before `train()`.
    """
    for name, param in model.named_parameters():
        if param.requires_grad and ".modules_to_save." in name:
            param.data = param.data.float()


# ------------------------------------------------------------------------------------------ running


def trainer_arguments(config: StageConfig, device: str) -> dict[str, Any]:
    """Keyword arguments of TRL's `SFTConfig` / `GRPOConfig` that every stage sets the same way."""
    return {
        "output_dir": config.output_dir,
        "max_steps": config.max_steps,
        "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup,
        "seed": config.seed,
        "data_seed": config.seed,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit or None,
        "logging_steps": config.logging_steps,
        "report_to": list(config.report_to),
        "disable_tqdm": not config.progress,
        "use_cpu": device == "cpu",
        "bf16": device != "cpu",  # CPU autocast to bfloat16 is several times slower than float32 here
        "gradient_checkpointing": config.gradient_checkpointing,
        "dataloader_num_workers": 0,
    }


def quiet_console(trainer: Any) -> None:
    """Under `-q` the trainer prints no log lines or progress bar (metrics.jsonl and `report_to` get all)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if runtime.is_quiet():
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)


def resume_checkpoint(config: StageConfig) -> str | None:
    """The last `checkpoint-N` folder of the output dir when resuming (None: start from step 0)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not config.resume or not Path(config.output_dir).is_dir():
        return None
    return get_last_checkpoint(config.output_dir)


class JsonlMetricsCallback(TrainerCallback):
    """Each log (step, epoch, loss, lr, and whatever else the trainer logs) as a line of `metrics.jsonl`.

    On resume, lines past the checkpoint's step (logged by the killed run after its last save) are dropped
    first, so the file reads as one run whose step counter and loss curve continue.
    """

    def __init__(self, output_dir: str | Path, resume_from: str | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            self.path.write_text("")
        elif self.path.exists():
            state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= state["global_step"]]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record |= {("lr" if k == "learning_rate" else k): v for k, v in logs.items() if k != "epoch"}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ saving


def save_final(model: Any, loaded: LoadedModel, config: StageConfig,
               directory: str | Path | None = None, answers: Sequence[str] | None = None) -> Path:
    """`save_pretrained` of the trained model + processor to `directory` (default `<output_dir>/final`).

    LoRA is merged into the weights (`merge_lora`), or kept: the adapter files (`adapter_config.json`,
    `adapter_model.safetensors`) sit beside the full base checkpoint, which transformers loads as a model with
    an embedded adapter. A QLoRA adapter is applied to the full-precision base: the saved model is never
    4-bit. Also writes `training_config.json` (the stage settings) and the answers to draft from at decoding
    (`anomaly_assistant.lookup`): `answers` (SFT's assistant turns), else the starting model folder's.
    """
    from peft import PeftModel

    from anomaly_assistant import lookup

    out = Path(directory) if directory else Path(config.output_dir) / "final"
    if not _is_main_process():  # under `accelerate launch` rank 0 writes; the others wait for it
        _wait_for_everyone()
        return out
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        if loaded.full_precision_dir is not None:
            model = _onto_full_precision(model, loaded.full_precision_dir, out)
        if config.merge_lora:
            model = model.merge_and_unload()
        else:
            model.save_pretrained(out)
            model = model.unload()
    model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    (out / "training_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    start_corpus = Path(config.model) / lookup.CORPUS_FILE
    if answers:
        lookup.write_corpus(answers, out)
    elif start_corpus.is_file():
        shutil.copy2(start_corpus, out / lookup.CORPUS_FILE)
    _wait_for_everyone()
    return out


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _onto_full_precision(model: Any, base_dir: Path, scratch: Path) -> Any:
    """The trained adapter of a 4-bit model, loaded onto the full-precision base it was quantized from."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter_dir = scratch / "adapter-4bit"
    model.save_pretrained(adapter_dir)
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype="auto")
    full = PeftModel.from_pretrained(base, adapter_dir)
    for path in sorted(adapter_dir.iterdir()):
        path.unlink()
    adapter_dir.rmdir()
    return full
