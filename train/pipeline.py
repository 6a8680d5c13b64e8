"""`anomaly-assistant train pipeline`: data build -> stage 1 (expert) -> SFT -> GRPO, one folder, a card.

One YAML with a section per stage (`data:`, `expert:`, `sft:`, `grpo:`; each section takes the options of its
own command, `train sft --help` etc., and flags spell them `--sft-max-steps`). The pipeline sets what links
the stages (model, data and output folders), so those keys are not options of the sections. Output:

```
DIR/data/      the `data build` output (skipped when `data.export` names an existing one)
DIR/expert_data/  a larger build for stage 1 and 1b only, when `data.expert_synth` asks for one
DIR/expert/    stage 1: checkpoints, metrics.jsonl, expert/ (the trained expert)
DIR/start/     the starting model with the stage-1 expert put inside it (what SFT trains)
DIR/sft/       stage 2 (its final/ is where GRPO starts)
DIR/grpo/      stage 3
DIR/           the final model (config.json, weights, processor) + README.md, the model card
```
`AnomalyAssistant.from_pretrained(DIR)` and `anomaly-assistant inspect IMAGE --model DIR` load the final
model. A rerun skips the stages whose output is complete and resumes a stage that was killed from its last
checkpoint (every stage runs with `resume`).

The stage-1 expert reads EfficientNet-Lite0 features with the CNN's own channels as v°; inside the chat model
v° is the backbone's visual tokens. `install_expert` therefore builds the model's expert with the stage-1
expert's feature source and sizes (v° width = the backbone's) and copies every tensor whose name and shape
agree: the level adapters, descriptors and fusion layers of the LTFM (the look-twice matching that makes the
significance map). The tensors that read v° (the look-back's input layer, the selector's query/key, the score
head) start from their initialisation, so stage 1b (`expert.adapt_epochs`, `train.expert.adapt_in_model`)
trains the expert again inside the model, on the same data and loss, with the backbone's own v°: without it
the score head of the default model ranked held-out images worse than chance (validation image AUROC 0.41;
0.94 after). The card lists the tensors and the validation AUROC before and after. The expert stays frozen
in SFT and GRPO, but v° is the projector's output (tokens in the LLM's space), so when SFT or GRPO train the
projector (or the vision tower) stage 1b runs again on the final model before it is measured: the default
model's expert, adapted before SFT, scored every held-out image anomalous after it.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomaly_assistant.commands.config import DEVICE_HELP, resolve_device
from anomaly_assistant.train.expert import ExpertStageConfig, adapt_in_model
from anomaly_assistant.train.grpo import GrpoStageConfig
from anomaly_assistant.train.sft import SftStageConfig

STAGE_NAMES = ("data", "expert", "start", "sft", "grpo", "final")
CARD_NAME = "README.md"
CONFIG_NAME = "pipeline_config.json"
QUALITY_NAME = "quality.json"
ADAPTATION_NAME = "expert_adaptation.json"  # stage 1b on the final model (when SFT / GRPO moved v°)


@dataclass
class DataSection:
    """What the pipeline trains on: an existing `data build` output, or a build (sources, SynthInspect)."""

    export: str = field(default="", metadata={"help": "an existing `data build` output folder (no build)"})
    sources: list[str] = field(default_factory=list, metadata={"help": "`data build --source` specs"})
    synth: int = field(default=0, metadata={"help": "SynthInspect images to generate (half anomalous)"})
    synth_size: int = field(default=96, metadata={"help": "SynthInspect image side in pixels"})
    textures: int = field(default=0, metadata={"help": "scikit-image texture crops (half given defects)"})
    kinds: list[str] = field(
        default_factory=list, metadata={"help": "conversation kinds per image (default: all of `data build`)"}
    )
    fractions: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1],
        metadata={"help": "train / validation / test fractions (the test split is the card's held-out set)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the build"})
    expert_synth: int = field(default=0, metadata={
        "help": "SynthInspect images of a second build that stage 1 and 1b train on instead (0: the same "
                "data as SFT). The expert learns from every image in a few seconds per epoch, SFT from a "
                "fixed number of steps; built with seed + 1, so none of its images is in the SFT splits"})
    expert_textures: int = field(default=0, metadata={"help": "texture crops in that second build"})


# The stage sections: a stage's own options, without the ones the pipeline sets (init=False: no flag, no key).
@dataclass
class ExpertSection(ExpertStageConfig):
    """Stage 1 options (`train expert --help`); data and output folder are the pipeline's."""

    data: str = field(default="", init=False)
    output_dir: str = field(default="", init=False)
    resume: bool = field(default=True, init=False)
    adapt_epochs: int = field(
        default=-1,
        metadata={
            "help": "epochs of training the expert again inside the chat model, on the backbone's own v° "
            "(-1: as many as `epochs`; 0: leave the v°-reading tensors at their initialisation)"
        },
    )


@dataclass(kw_only=True)
class SftSection(SftStageConfig):
    """Stage 2 options (`train sft --help`); model, data and output folder are the pipeline's."""

    model: str = field(default="", init=False)
    data: str = field(default="", init=False)
    output_dir: str = field(default="", init=False)
    resume: bool = field(default=True, init=False)


@dataclass(kw_only=True)
class GrpoSection(GrpoStageConfig):
    """Stage 3 options (`train grpo --help`); model, data and output folder are the pipeline's."""

    model: str = field(default="", init=False)
    data: str = field(default="", init=False)
    output_dir: str = field(default="", init=False)
    resume: bool = field(default=True, init=False)


@dataclass
class PipelineConfig:
    """Data build -> stage 1 expert -> SFT -> GRPO into one folder with a model card (a YAML section each)."""

    output_dir: str = field(
        default="runs/pipeline",
        metadata={
            "help": "the folder of the final model, its card, and one subfolder per stage",
            "aliases": ["--out"],
        },
    )
    model: str = field(
        default="tiny:qwen2_5_vl",
        metadata={
            "help": "starting model: tiny:<family>, default-base (the embedded default model's base), a "
            "plain Qwen2.5-VL / LLaVA(-OneVision) checkpoint, or an anomaly checkpoint folder"
        },
    )
    skip_expert: bool = field(
        default=False, metadata={"help": "no stage 1: SFT starts from the model's own (untrained) expert"}
    )
    eval_split: str = field(
        default="test", metadata={"help": "held-out split the card's quality is measured on"}
    )
    eval_limit: int = field(default=0, metadata={"help": "most held-out images measured (0 = all)"})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "answer length when measuring"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    data: DataSection = field(default_factory=DataSection, metadata={"help": "what to train on"})
    expert: ExpertSection = field(default_factory=ExpertSection, metadata={"help": "stage 1 (the expert)"})
    sft: SftSection = field(default_factory=SftSection, metadata={"help": "stage 2 (SFT)"})
    grpo: GrpoSection = field(default_factory=GrpoSection, metadata={"help": "stage 3 (GRPO)"})


# ------------------------------------------------------------------------------------------ expert transfer


def install_expert(
    model: Any, processor: Any, expert_dir: str | Path
) -> tuple[Any, Any, dict[str, list[str]]]:
    """(model, processor, report) with a stage-1 expert inside the model, the rest of the model unchanged.

    The model is rebuilt with an expert of the stage-1 expert's feature source and sizes (its v° width stays
    the backbone's), the stage-1 tensors whose names and shapes agree are copied, and the processor is
    re-wrapped so it emits the CNN input. `report` lists the tensors `copied` and `kept` (initialised).
    """
    import torch

    from anomaly_assistant import backbones
    from anomaly_assistant.expert import AnomalyExpert, ExpertConfig
    from anomaly_assistant.modeling import cnn_input_size
    from anomaly_assistant.processing import anomaly_processor

    stage1 = AnomalyExpert.from_pretrained(expert_dir)
    current = ExpertConfig.from_dict(model.config.expert)
    merged = ExpertConfig.from_dict(
        {
            **stage1.config.to_dict(),
            "token_dim": current.token_dim,
            "llm_dim": current.llm_dim,
            "level_words": current.level_words,
        }
    )
    family = backbones.family_of(model.config)
    config = copy.deepcopy(model.config)
    config.expert = merged.to_dict()
    rebuilt = backbones.get(family).ANOMALY_MODEL_CLASS(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.expert.")}
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.expert.") for k in missing):
        raise RuntimeError(f"model weights do not fit the rebuilt model: {missing[:3]}, {unexpected[:3]}")
    rebuilt.model.expert.reset_parameters()
    ours = rebuilt.model.expert.state_dict()
    report: dict[str, list[str]] = {"copied": [], "kept": []}
    with torch.no_grad():
        for name, value in stage1.state_dict().items():
            if name in ours and ours[name].shape == value.shape and name != "trained":
                ours[name].copy_(value)
                report["copied"].append(name)
        report["kept"] = [n for n in ours if n not in report["copied"] and n != "trained"]
    rebuilt.model.expert.mark_trained(stage1.is_trained)
    rebuilt.generation_config = model.generation_config
    rebuilt = rebuilt.to(dtype=next(model.parameters()).dtype).eval()
    wrapped = anomaly_processor(processor, family, merged.num_tokens, cnn_input_size(merged))
    return rebuilt, wrapped, report


# ------------------------------------------------------------------------------------------ quality


def measure(
    model: str,
    data: str,
    split: str = "test",
    limit: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    rewards: Any = None,
) -> dict[str, Any]:
    """Parse rate, verdict precision / recall / F1 and rewards (mean, per term, per answer) on a split.

    Answers come from `AnomalyAssistant.inspect_batch` (the product path, no references). `answer_f1` reads
    the verdict from the answer text only (an answer that does not parse counts as wrong); `product_f1` is the
    verdict the user sees (an unparsed answer falls back to the expert's verdict).
    """
    from anomaly_assistant import scoring
    from anomaly_assistant.assistant import AnomalyAssistant
    from anomaly_assistant.train.common import load_export
    from anomaly_assistant.train.grpo import reward_columns
    from anomaly_assistant.train.rewards import RewardConfig, reward_functions, reward_report

    rewards = rewards or RewardConfig()
    columns_needed = reward_columns(reward_functions(rewards)[0])
    rows = load_export(data, "grpo", split, ("image", "gt_label", *columns_needed), limit)
    assistant = AnomalyAssistant.from_pretrained(model, device=device)
    findings = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        findings += assistant.inspect_batch(rows[i : i + batch_size]["image"], max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    labels = [int(y) for y in rows["gt_label"]]
    parsed = [f.parse_error is None for f in findings]
    answer = [int(f.verdict == "anomalous") if ok else 1 - y for f, ok, y in zip(findings, parsed, labels)]
    product = [int(f.verdict == "anomalous") for f in findings]
    a, p = scoring.binary_metrics(labels, answer), scoring.binary_metrics(labels, product)
    report = reward_report([f.raw_text for f in findings], rewards, **{c: rows[c] for c in columns_needed})
    return {
        "model": model,
        "split": split,
        "n": len(findings),
        "anomalous": sum(labels),
        "parse_rate": sum(parsed) / len(parsed) if parsed else None,
        "answer_accuracy": a["accuracy"],
        "answer_precision": a["precision"],
        "answer_recall": a["recall"],
        "answer_f1": a["f1"],
        "product_f1": p["f1"],
        "reward": report["reward"],
        "rewards": {k: v for k, v in report.items() if k not in ("n", "reward", "totals")},
        "reward_totals": report["totals"],
        "seconds": round(seconds, 1),
    }


# ------------------------------------------------------------------------------------------ running


def _done(path: Path) -> bool:
    return path.exists()


def _log(message: str) -> None:
    print(f"[pipeline] {message}", flush=True)


def _chat_stage(label: str, module: Any, settings: Any, model_dir: Path, data: Path, stage_out: Path,
                timings: dict[str, float]) -> Path:
    """Run one chat-model stage (SFT or GRPO) from `model_dir` into `stage_out`, unless it already finished.

    Returns the stage's final folder; a rerun of the pipeline skips a finished stage and resumes an unfinished
    one. Its time is recorded under the folder's name.
    """
    final = stage_out / "final"
    if _done(final / "training_config.json"):
        _log(f"{label} is complete, skipped")
        return final
    stage = copy.copy(settings)
    stage.model, stage.data, stage.output_dir, stage.resume = str(model_dir), str(data), str(stage_out), True
    started = time.perf_counter()
    _log(label)
    module.run(stage)
    timings[stage_out.name] = time.perf_counter() - started
    return final


def run(config: PipelineConfig) -> Path:
    """Run the stages that are not finished yet, then write the final model and its card; returns DIR."""
    from anomaly_assistant import default_model
    from anomaly_assistant.train import expert as expert_stage
    from anomaly_assistant.train import grpo as grpo_stage
    from anomaly_assistant.train import sft as sft_stage
    from anomaly_assistant.train.common import InputError, is_tiny

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    config = copy.copy(config)
    config.model = default_model.resolve_source(config.model)
    (out / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=1) + "\n")
    timings: dict[str, float] = {}
    family = _family(config.model)

    # data
    data = Path(config.data.export) if config.data.export else out / "data"
    if config.data.export:
        if not data.is_dir():
            raise InputError(f"data.export {data} does not exist")
    elif not _done(data / "summary.json"):
        if not (config.data.sources or config.data.synth or config.data.textures):
            raise InputError("data: give export, sources, synth or textures")
        started = time.perf_counter()
        _build_data(config, data, out, family)
        timings["data"] = time.perf_counter() - started
    else:
        _log(f"data: {data} is complete, skipped")
    expert_data = data
    if config.data.expert_synth and not config.skip_expert:
        expert_data = out / "expert_data"
        if not _done(expert_data / "summary.json"):
            started = time.perf_counter()
            _build_data(config, expert_data, out, family, expert=True)
            timings["expert_data"] = time.perf_counter() - started
        else:
            _log(f"data: {expert_data} is complete, skipped")

    # stage 1
    expert_dir = out / "expert" / "expert"
    if not config.skip_expert:
        if not _done(expert_dir / "expert.safetensors"):
            stage = copy.copy(config.expert)
            stage.data, stage.output_dir, stage.resume = str(expert_data), str(out / "expert"), True
            started = time.perf_counter()
            _log("stage 1: expert")
            expert_stage.run(stage)
            timings["expert"] = time.perf_counter() - started
        else:
            _log("stage 1: expert is complete, skipped")

    # the starting model, with the stage-1 expert inside
    start_dir = out / "start"
    transfer: dict[str, list[str]] = {}
    if not _done(start_dir / "expert_transfer.json"):
        started = time.perf_counter()
        model, processor = _load_start(config.model, device)
        if not config.skip_expert:
            model, processor, transfer = install_expert(model, processor, expert_dir)
            if transfer["kept"] and _adapt_epochs(config):
                _log("stage 1b: the expert inside the model, on the backbone's v°")
                transfer["adapted"] = _adapt(model, processor, expert_data, config)
        model.save_pretrained(start_dir)
        processor.save_pretrained(start_dir)
        (start_dir / "expert_transfer.json").write_text(json.dumps(transfer, indent=1) + "\n")
        timings["start"] = time.perf_counter() - started
        del model
    transfer = json.loads((start_dir / "expert_transfer.json").read_text())

    sft_final = _chat_stage("stage 2: SFT", sft_stage, config.sft, start_dir, data, out / "sft", timings)
    grpo_final = _chat_stage("stage 3: GRPO", grpo_stage, config.grpo, sft_final, data, out / "grpo", timings)

    # final model + card
    if not _done(out / CARD_NAME):
        for item in grpo_final.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
        if transfer.get("adapted") and _moves_v0(config):
            started = time.perf_counter()
            _log("stage 1b again: the expert on the final model's v° (the projector trained since)")
            model, processor = _load_start(str(out), device)
            transfer["adapted_final"] = _adapt(model, processor, expert_data, config)
            model.save_pretrained(out)
            (out / ADAPTATION_NAME).write_text(json.dumps(transfer["adapted_final"], indent=1) + "\n")
            timings["expert_final"] = time.perf_counter() - started
            del model
        started = time.perf_counter()
        quality = {}
        for name, folder in (("untrained", start_dir), ("sft", sft_final), ("final", out)):
            _log(f"measuring {name} on the {config.eval_split} split")
            quality[name] = measure(
                str(folder),
                str(data),
                config.eval_split,
                config.eval_limit,
                config.eval_max_new_tokens,
                device=device,
                rewards=config.grpo.rewards,
            )
        timings["measure"] = time.perf_counter() - started
        (out / QUALITY_NAME).write_text(json.dumps(quality, indent=1) + "\n")
        (out / CARD_NAME).write_text(
            model_card(config, data, transfer, quality, timings, is_tiny(config.model))
        )
    else:
        _log("final model and card are complete, skipped")
    return out


def _family(model: str) -> str:
    from anomaly_assistant import backbones, modeling  # noqa: F401  modeling registers every family's classes
    from anomaly_assistant.train.common import is_tiny

    if is_tiny(model):
        return model.partition(":")[2] or "qwen2_5_vl"
    from transformers import AutoConfig

    return backbones.family_of(AutoConfig.from_pretrained(model))


def _adapt_epochs(config: PipelineConfig) -> int:
    e = config.expert
    return e.epochs if e.adapt_epochs < 0 else e.adapt_epochs


def _adapt(model: Any, processor: Any, data: Path, config: PipelineConfig) -> dict[str, Any]:
    """Stage 1b with the expert section's settings: the expert trained again inside `model`."""
    e = config.expert
    return adapt_in_model(model, processor, str(data), _adapt_epochs(config), e.batch_size, e.learning_rate,
                          e.weight_decay, e.mask_loss, e.seed, e.max_samples, e.progress)


def _moves_v0(config: PipelineConfig) -> bool:
    """Whether SFT or GRPO trains what makes v° (the projector or the vision tower): the expert reads it."""
    return any(part in ("projector", "vision") for part in [*config.sft.trainable, *config.grpo.trainable])


def _load_start(source: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from anomaly_assistant import modeling
    from anomaly_assistant.train.common import is_tiny

    if is_tiny(source):
        return modeling.tiny_anomaly_model(source.partition(":")[2] or "qwen2_5_vl")
    dtype = torch.float32 if device == "cpu" else "auto"
    if AutoConfig.from_pretrained(source).model_type.startswith("anomaly_"):
        return (
            AutoModelForImageTextToText.from_pretrained(source, dtype=dtype),
            AutoProcessor.from_pretrained(source),
        )
    return modeling.load_backbone_as_anomaly(source, dtype=dtype)


def _build_data(config: PipelineConfig, data: Path, out: Path, family: str, expert: bool = False) -> None:
    """`data build` into `data`, boxes in the starting model's own input frame (its processor saved first).

    expert: the expert stages' own build (`data.expert_synth`): inspection rows only, seed + 1.
    """
    import datasets

    from anomaly_assistant.data_builders.build import BuildConfig, build
    from anomaly_assistant.train.common import is_tiny

    processor = config.model
    if is_tiny(config.model):  # save the tiny processor: the export's box frame is then exact
        processor = str(out / "start-processor")
        if not Path(processor).is_dir():
            _load_start(config.model, "cpu")[1].save_pretrained(processor)
    section = config.data
    extra = {"kinds": list(section.kinds)} if section.kinds else {}
    sources, synth, textures, seed = list(section.sources), section.synth, section.textures, section.seed
    if expert:  # synthetic only: a source's images would land in other splits than in the SFT build
        sources, synth, textures = [], section.expert_synth, section.expert_textures
        seed, extra = seed + 1, {"kinds": ["inspect"]}
    datasets.disable_progress_bars()
    _log(f"data: building into {data}")
    build(
        BuildConfig(
            out=str(data),
            sources=sources,
            synth=synth,
            synth_size=section.synth_size,
            textures=textures,
            backbone=family,
            processor=processor,
            fractions=list(section.fractions),
            seed=seed,
            progress=False,
            **extra,
        )
    )


def model_card(
    config: PipelineConfig,
    data: Path,
    transfer: dict[str, list[str]],
    quality: dict[str, Any],
    timings: dict[str, float],
    tiny: bool,
) -> str:
    """The README.md of the output folder: data, settings and the quality measured on the held-out split."""
    summary_path = data / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [anomaly-detection, visual-inspection, anomaly-assistant]",
        "---",
        "",
        f"# anomaly-assistant model ({config.model})",
        "",
        "Trained by `anomaly-assistant train pipeline`: data build -> stage 1 (expert) -> SFT -> GRPO.",
    ]
    if tiny:
        lines += [
            "",
            "A tiny random-initialised model for smoke tests: its figures say the pipeline runs, "
            "not that it inspects well.",
        ]
    lines += ["", "## Data", "", f"- folder: `{data}`"]
    if config.data.export:
        lines.append("- an existing `data build` output (`data.export`)")
    else:
        d = config.data
        lines.append(
            f"- built here: sources {d.sources or 'none'}, SynthInspect {d.synth} images of {d.synth_size}"
            f" px, textures {d.textures}, seed {d.seed}, fractions {d.fractions}"
        )
        if d.expert_synth and not config.skip_expert:
            lines.append(f"- the expert (stage 1 and 1b) on a second build, `expert_data/`: SynthInspect "
                         f"{d.expert_synth} images, textures {d.expert_textures}, seed {d.seed + 1}")
    if summary:
        lines.append(f"- summary: `{json.dumps(summary.get('splits', summary))[:600]}`")
    lines += ["", "## Stages and settings", ""]
    if config.skip_expert:
        lines.append("- stage 1: skipped (`skip_expert`); the model's own expert is untrained")
    else:
        e = config.expert
        copied, kept = transfer.get("copied", []), transfer.get("kept", [])
        kept_modules = sorted({".".join(k.split(".")[:2]) for k in kept})
        lines.append(
            f"- stage 1 expert: EfficientNet-Lite0 features at {e.image_size} px, {e.epochs} epochs, "
            f"lr {e.learning_rate}, mask loss {e.mask_loss}; into the model: {len(copied)} tensors copied, "
            f"{len(kept)} started from their initialisation (those that read the backbone's v°: "
            f"{', '.join(kept_modules)})"
        )
        if adapted := transfer.get("adapted"):
            lines.append(
                f"- stage 1b, the expert inside the model on the backbone's v°: {adapted['steps']} steps; "
                f"validation image AUROC {_fmt(adapted.get('val_image_auroc_before'))} -> "
                f"{_fmt(adapted.get('val_image_auroc_after'))}, pixel AUROC "
                f"{_fmt(adapted.get('val_pixel_auroc_before'))} -> "
                f"{_fmt(adapted.get('val_pixel_auroc_after'))}"
            )
        if again := transfer.get("adapted_final"):
            lines.append(
                f"- stage 1b again after SFT / GRPO (they trained the projector, so v° moved): validation "
                f"image AUROC {_fmt(again.get('val_image_auroc_before'))} -> "
                f"{_fmt(again.get('val_image_auroc_after'))}, pixel AUROC "
                f"{_fmt(again.get('val_pixel_auroc_before'))} -> {_fmt(again.get('val_pixel_auroc_after'))}"
            )
    for name, stage in (("sft", config.sft), ("grpo", config.grpo)):
        settings = {
            k: v
            for k, v in asdict(stage).items()
            if k
            in (
                "tuning",
                "trainable",
                "lora_r",
                "max_steps",
                "epochs",
                "batch_size",
                "learning_rate",
                "num_generations",
                "max_completion_length",
                "rewards",
                "seed",
                "format",
            )
        }
        lines.append(f"- {name}: `{json.dumps(settings)}`")
    if timings:
        lines.append("- wall time of this run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    lines += [
        "",
        f"## Quality on the held-out `{config.eval_split}` split",
        "",
        "Measured by `train.pipeline.measure` (the product's `inspect_batch`, no reference images).",
        "",
        "| model | n | parse rate | answer F1 | product F1 | mean reward |",
        "|---|---|---|---|---|---|",
    ]
    for name, q in quality.items():
        lines.append(
            f"| {name} | {q['n']} | {_fmt(q['parse_rate'])} | {_fmt(q['answer_f1'])} | "
            f"{_fmt(q['product_f1'])} | {_fmt(q['reward'])} |"
        )
    lines += [
        "",
        "answer F1: the verdict in the answer text (unparsed = wrong); product F1: the verdict shown "
        "(an unparsed answer falls back to the expert).",
    ]
    sft, final = quality.get("sft", {}).get("reward_totals"), quality.get("final", {}).get("reward_totals")
    if sft and final and len(sft) == len(final) >= 2:
        from anomaly_assistant.train.rewards import paired_gain

        g = paired_gain(sft, final)
        lines += [
            "",
            f"GRPO's gain in mean reward over SFT on these {g['n']} answers: {g['gain']:+.3f} (95 % "
            f"bootstrap interval {g['low']:+.3f} .. {g['high']:+.3f}; one that straddles 0 is no measured "
            "gain).",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from anomaly_assistant import AnomalyAssistant",
        f"assistant = AnomalyAssistant.from_pretrained({str(Path(config.output_dir))!r})",
        "finding = assistant.chat(references=[...]).inspect('part.png')",
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
