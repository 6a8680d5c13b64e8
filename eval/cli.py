"""`anomaly-assistant eval {ad,detect,reasoning,mmad}`: thin entry points over the eval library.

Each sub-command has one dataclass config read by the project's one config parser (`commands.config`: flags
from its fields, or `--config file.yaml` with flags overriding it), builds the assistant, runs, and writes
`--out FILE.json` plus `FILE.md` / `FILE.html` / `FILE_figures/`. Under `accelerate launch` every process
evaluates its share; the main process writes.

Inputs are checked before the model loads: a missing `--data`, an unknown `--category`, `--shots` the data
cannot give, or a folder in the wrong layout is one line and exit 2 (usage) or 1 (data), never a traceback
or a report of 0 images.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly_assistant.commands.config import DEVICE_HELP, UsageError, parse_config, resolve_device
from anomaly_assistant.commands.runtime import InputError, dispatch, load_model, note
from anomaly_assistant.eval.judge import JudgeConfig
from anomaly_assistant.localize import DEFAULT_THRESHOLD, check_threshold

# ------------------------------------------------------------------------------------------ configs


@dataclass
class ModelArgs:
    """How to build the assistant (shared by every sub-command)."""

    model: str | None = field(default=None, metadata={
        "help": "checkpoint directory or hub id (default: the embedded default model)"})
    expert_only: bool = field(default=False, metadata={
        "help": "no LLM generation: the expert screens (no --model needed; with --model, that model's "
                "expert)"})
    feature_source: str | None = field(default=None, metadata={
        "help": "expert feature source (expert-only: efficientnet_lite0; a model: its own, or the one given "
                "when wrapping a plain backbone)", "choices": ["efficientnet_lite0", "backbone"]})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    limit: int | None = field(default=None, metadata={
        "help": "evaluate only N items spread over the set (quick runs)"})
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={
        "help": "decision threshold on the calibrated score, in [0, 1]: the verdicts (and the metrics at the "
                "operating threshold) follow it"})

    def __post_init__(self) -> None:
        self.threshold = check_threshold(self.threshold)


@dataclass(kw_only=True)
class ADConfig(ModelArgs):
    """`eval ad`: image AUROC / AP, pixel AUROC and PRO of one MVTec-layout category, k-shot."""

    out: str = field(metadata={"help": "result JSON path"})
    data: str = field(metadata={"help": "MVTec-layout root (ROOT/CAT/{train,test,ground_truth})"})
    category: str = field(metadata={"help": "category folder under ROOT"})
    shots: int = field(default=4, metadata={
        "help": "k reference normals: the first k of train/good, sorted (see --reference-seed)"})
    reference_seed: int | None = field(default=None, metadata={
        "help": "draw the k references at random from train/good with this seed (default: the first k)"})
    batch_size: int = field(default=8, metadata={"help": "images per screening / batched inspection call"})
    max_new_tokens: int = field(default=256, metadata={"help": "inspection answer length (with a model)"})


@dataclass(kw_only=True)
class DetectConfig(ModelArgs):
    """`eval detect`: yes/no detection by the VisA-D&R protocol."""

    out: str = field(metadata={"help": "result JSON path"})
    data: str = field(metadata={"help": "MVTec-layout root or VisA-D&R JSON"})
    category: str | None = field(default=None, metadata={"help": "one class (default: all)"})
    references: int = field(default=0, metadata={"help": "k reference normals per class (few-shot mode)"})
    image_root: str | None = field(default=None, metadata={
        "help": "image root for a JSON (default: its folder)"})
    max_new_tokens: int = field(default=16, metadata={"help": "reply length"})


@dataclass(kw_only=True)
class ReasoningConfig(ModelArgs):
    """`eval reasoning`: VisA-D&R dialogues replayed and scored against the reference answers."""

    out: str = field(metadata={"help": "result JSON path"})
    data: str = field(metadata={"help": "VisA-D&R JSON (LLaVA conversation format)"})
    image_root: str | None = field(default=None, metadata={"help": "image root (default: the JSON's folder)"})
    category: str | None = field(default=None, metadata={"help": "one class (default: all)"})
    max_new_tokens: int = field(default=256, metadata={"help": "answer length per turn"})
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={
        "help": "the LLM judge of the answers (none unless --judge-endpoint or --judge-local-model is set)"})


@dataclass(kw_only=True)
class MMADConfig(ModelArgs):
    """`eval mmad`: MMAD-style multiple-choice questions."""

    out: str = field(metadata={"help": "result JSON path"})
    data: str = field(metadata={"help": "MMAD JSON (object keyed by image path)"})
    image_root: str | None = field(default=None, metadata={
        "help": "MMAD image root (default: the JSON's folder)"})
    reference: bool = field(default=True, metadata={
        "help": "show one normal reference image with each question; --no-reference asks zero-shot"})
    template: str = field(default="random", metadata={
        "help": "which of MMAD's templates is the reference: random_templates[0] (MMAD's 1-shot default) or "
                "similar_templates[0]", "choices": ["random", "similar"]})
    max_new_tokens: int = field(default=16, metadata={"help": "reply length"})


# ------------------------------------------------------------------------------------------ running


def build_assistant(cfg: ModelArgs) -> Any:
    """`AnomalyAssistant.expert_only(...)` or `.from_pretrained(...)`: eval never touches model internals."""
    from anomaly_assistant import AnomalyAssistant

    if cfg.expert_only and not cfg.model:
        return AnomalyAssistant.expert_only(feature_source=cfg.feature_source or "efficientnet_lite0",
                                            threshold=cfg.threshold)
    # --expert-only with --model: the model's own expert screens (`screen`), the LLM never generates.
    check_usage(cfg)
    kwargs = {"feature_source": cfg.feature_source} if cfg.feature_source else {}
    return load_model(cfg.model, resolve_device(cfg.device), "evaluate the expert alone: --expert-only",
                      threshold=cfg.threshold, **kwargs)


def check_usage(cfg: ModelArgs) -> None:
    """UsageError for what the command line alone gets wrong (the device)."""
    resolve_device(cfg.device)


def check_data_exists(data: str) -> Path:
    """`--data` as a Path; InputError naming it when nothing is there."""
    path = Path(data)
    if not path.exists():
        raise InputError(f"--data {data}: no such file or folder")
    return path


def check_ad_inputs(cfg: ADConfig) -> None:
    """The category exists and train/good can give `--shots` references, before any model loads."""
    from anomaly_assistant.images import IMAGE_SUFFIXES

    root = check_data_exists(cfg.data)
    layout = "an MVTec-layout root: ROOT/CATEGORY/{train/good,test/<good|defect>}/*.png"
    if not root.is_dir():
        raise InputError(f"--data {root}: a file, expected {layout}")
    categories = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not categories:
        hint = (f" ({root} looks like a category itself: pass --data {root.parent} --category {root.name})"
                if (root / "test").is_dir() else "")
        raise InputError(f"--data {root}: no CATEGORY/test folder in it; expected {layout}{hint}")
    if cfg.category not in categories:
        raise UsageError(f"unknown --category {cfg.category!r}: {root} has {', '.join(categories)}")
    good = root / cfg.category / "train" / "good"
    n_good = sum(1 for p in good.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if good.is_dir() else 0
    if cfg.shots < 0 or (cfg.shots == 0 and cfg.expert_only and not cfg.model):
        raise UsageError(f"--shots must be at least 1 (reference normals from {good}); zero-shot (--shots 0) "
                         "needs a model whose expert is trained (drop --expert-only)")
    if cfg.shots > 0 and n_good == 0:
        raise InputError(f"{good}: no normal images to take --shots {cfg.shots} references from")
    if cfg.shots > n_good:
        raise UsageError(f"--shots {cfg.shots}: {good} has only {n_good} normal images "
                         f"(use --shots 1..{n_good})")


def check_detect_inputs(cfg: DetectConfig) -> None:
    """The data holds images to evaluate in a layout `detection.load` reads, before any model loads."""
    from anomaly_assistant.eval import detection

    check_data_exists(cfg.data)
    recs, _ = detection.load(cfg.data, cfg.category, cfg.references, cfg.image_root)
    if not recs:
        which = f" of --category {cfg.category}" if cfg.category else ""
        raise InputError(f"--data {cfg.data}: no test images{which} found; expected an MVTec-layout root "
                         "(ROOT/CATEGORY/test/<good|defect>/*.png) or a VisA-D&R JSON")


def mode(cfg: ModelArgs) -> str:
    """What answers in this run, as reports name it."""
    if cfg.expert_only and cfg.model:
        return f"expert of {cfg.model}"
    if cfg.expert_only:
        return f"expert-only ({cfg.feature_source or 'efficientnet_lite0'})"
    return f"assistant ({cfg.model or 'default model'})"


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    """The result as indented JSON (numpy scalars and paths made plain)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, ensure_ascii=False, default=_jsonable)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_rows(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Per-item predictions next to the result (`X_predictions.jsonl`), arrays left out."""
    path = Path(out).with_suffix("")
    path = path.with_name(path.name + "_predictions.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            keep = {k: v for k, v in row.items() if not hasattr(v, "shape")}
            fh.write(json.dumps(keep, ensure_ascii=False, default=_jsonable) + "\n")
    return path


def _finish(result: dict[str, Any], cfg: ModelArgs, write_report, rows: list[dict[str, Any]]) -> int:
    from anomaly_assistant.eval import distributed

    if not rows:  # an empty evaluation is no result: say what was read instead of writing null metrics
        data = cfg.data  # type: ignore[attr-defined]
        raise InputError(f"--data {data}: nothing to evaluate (0 items read); check its layout, --category "
                         "and --image-root")
    if not distributed.is_main_process():
        return 0
    result.update({"mode": mode(cfg), "model": cfg.model, "feature_source": cfg.feature_source,
                   **distributed.main_process_info()})
    out = Path(cfg.out)  # type: ignore[attr-defined]
    md, html = write_report(result, out)
    result["report"] = {"markdown": md.name, "html": html.name, "predictions": write_rows(rows, out).name}
    write_json(result, out)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, default=_jsonable))
    note(f"wrote {out}, {md}, {html}")
    return 0


def run_ad(cfg: ADConfig) -> int:
    """`eval ad`."""
    from anomaly_assistant.eval import ad

    check_ad_inputs(cfg)
    assistant = build_assistant(cfg)
    note(f"evaluating {cfg.category} ({cfg.shots}-shot) ...")
    result, records, preds = ad.evaluate(assistant, cfg.data, cfg.category, cfg.shots,
                                         batch_size=cfg.batch_size, expert_only=cfg.expert_only,
                                         limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                                         reference_seed=cfg.reference_seed)
    draw = "" if cfg.reference_seed is None else f", references drawn with seed {cfg.reference_seed}"
    title = f"AD metrics: {cfg.category} ({cfg.shots}-shot{draw}, {mode(cfg)})"
    return _finish(result, cfg, lambda res, out: ad.write_report(res, records, preds, out, title), preds)


def run_detect(cfg: DetectConfig) -> int:
    """`eval detect`."""
    from anomaly_assistant.eval import detection

    check_detect_inputs(cfg)
    assistant = build_assistant(cfg)
    note(f"evaluating detection on {cfg.data} ...")
    result, preds = detection.evaluate(assistant, cfg.data, cfg.category, cfg.references,
                                       expert_only=cfg.expert_only, max_new_tokens=cfg.max_new_tokens,
                                       image_root=cfg.image_root, limit=cfg.limit)
    title = f"Detection (VisA-D&R protocol): {Path(cfg.data).name} ({mode(cfg)})"
    return _finish(result, cfg, lambda res, out: detection.write_report(res, preds, out, title), preds)


def run_reasoning(cfg: ReasoningConfig) -> int:
    """`eval reasoning`."""
    from anomaly_assistant.eval import reasoning
    from anomaly_assistant.eval.judge import build_judge, config_dict

    check_data_exists(cfg.data)
    assistant = build_assistant(cfg)
    judge = build_judge(cfg.judge)
    result, turns = reasoning.evaluate(assistant, cfg.data, judge=judge, image_root=cfg.image_root,
                                       category=cfg.category, max_new_tokens=cfg.max_new_tokens,
                                       limit=cfg.limit)
    result["judge"] = config_dict(cfg.judge) if judge else None
    title = f"Reasoning (VisA-D&R protocol): {Path(cfg.data).name} ({mode(cfg)})"
    return _finish(result, cfg, lambda res, out: reasoning.write_report(res, turns, out, title), turns)


def run_mmad(cfg: MMADConfig) -> int:
    """`eval mmad`."""
    from anomaly_assistant.eval import mmad

    check_data_exists(cfg.data)
    assistant = build_assistant(cfg)
    result, rows = mmad.evaluate(assistant, cfg.data, image_root=cfg.image_root, use_reference=cfg.reference,
                                 template=cfg.template, max_new_tokens=cfg.max_new_tokens, limit=cfg.limit)
    title = f"MMAD-style multiple choice: {Path(cfg.data).name} ({mode(cfg)})"
    return _finish(result, cfg, lambda res, out: mmad.write_report(res, rows, out, title), rows)


SUBCOMMANDS = {
    "ad": (ADConfig, run_ad, "image AUROC/AP, pixel AUROC, PRO on an MVTec-layout category"),
    "detect": (DetectConfig, run_detect, "yes/no detection, VisA-D&R protocol (per class + macro)"),
    "reasoning": (ReasoningConfig, run_reasoning, "replay VisA-D&R dialogues; ROUGE-L, SBERT, LLM judge"),
    "mmad": (MMADConfig, run_mmad, "MMAD multiple choice with one normal reference, scored as MMAD scores"),
}


def main(argv: list[str] | None = None, command: str = "eval") -> int:
    """`anomaly-assistant eval SUBCOMMAND ...`; usage errors print one line and return 2."""
    prog = f"anomaly-assistant {command}"

    def run_one(name: str, rest: list[str]) -> int:
        cls, run, help_text = SUBCOMMANDS[name]
        cfg = parse_config(cls, rest, f"{prog} {name}", help_text)
        check_usage(cfg)  # command-line mistakes first, then the data, then the (slow) model
        return run(cfg)

    helps = {name: help_text for name, (_, _, help_text) in SUBCOMMANDS.items()}
    argv = sys.argv[1:] if argv is None else argv
    return dispatch(argv, prog, "Evaluate the assistant or its expert.", helps, run_one)
