"""`anomaly-assistant train export-default --run DIR`: the parts of a trained default model the package ships.

    anomaly-assistant train pipeline --config configs/pipeline_default_model.yaml --out runs/default-model
    anomaly-assistant train export-default --run runs/default-model

Writes `anomaly_assistant/resources/default_model/` (`default_model.export_parts`: the expert, the projector,
low-rank factors of the merged LoRA updates, configs; at most 30 MB) with `expert_answer_fields` set in its
config, so the assembled model answers with the expert's calibrated verdict and boxes and writes the rest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from anomaly_assistant import default_model, lookup
from anomaly_assistant.commands.runtime import InputError, note
from anomaly_assistant.expert import ExpertConfig
from anomaly_assistant.expert.reference import ScreenerConfig


@dataclass
class ExportConfig:
    """Export a trained default model's parts into the package's resources (or `--out`)."""

    run: str = field(metadata={"help": "the trained default model's folder (a `train pipeline` output)"})
    out: str = field(default=str(default_model.SHIPPED_DIR), metadata={"help": "where the parts go"})
    expert_answer_fields: list[str] = field(default_factory=lambda: ["verdict", "boxes"], metadata={
        "help": "answer fields the expert writes (empty: the LLM writes every field)"})
    score_fusion: float | None = field(default=0.8, metadata={
        "help": "weight of the reference score in the expert's fused image score (None: the run's). 0.8: on "
                "validation SynthInspect (seeds 4242 and 2024, 432 images, neither trained nor tested on), "
                "detection F1 at 0.5 was 0.961 against 0.948 with 0.7 and 0.936 with 0.9 (the LTFM score "
                "is overconfident on unseen parts; the reference score alone reaches 0.85)"})
    score_views: list[str] = field(default_factory=lambda: ["hflip"], metadata={
        "help": "flipped views whose LTFM scores are averaged with the image's own before fusion (empty: the "
                "image alone). The horizontal flip: on validation SynthInspect (seeds 4242 and 2024, 432 "
                "images) detection F1 at 0.5 went 0.941 / 0.981 -> 0.954 / 0.986 and the fused score's image "
                "AUROC 0.988 / 0.984 -> 0.990 / 0.990, for one more vision-tower pass (about 0.1 s); both "
                "flips did no better in F1 at twice the cost"})
    map_fusion: float | None = field(default=0.9, metadata={
        "help": "weight of the reference map in the map the expert shows and boxes (None: the run's). 0.9: "
                "with the sharper reference matching below, the expert's 14 x 14 map blurs the reference "
                "map; on validation SynthInspect (seed 4242, 216 images) the median best-box IoU went 0.47 "
                "-> 0.58 against 0.5"})
    reference_image_size: int | None = field(default=384, metadata={
        "help": "the side reference matching resizes parts to (None: the screener's default, 256). 384 (1 "
                "cell, no blur): on validation SynthInspect (seeds 4242 and 2024) the median best-box IoU "
                "went 0.56 -> 0.60 against 256, for about 15 ms more per inspection"})
    reference_patch_size: int | None = field(default=1, metadata={
        "help": "reference matching's neighbourhood aggregation in feature cells (None: the default, 3). 1 "
                "(with --reference-blur-sigma 0): on validation SynthInspect (seed 4242, 216 images) the "
                "median best-box IoU went 0.37 -> 0.47 and the fused score's image AUROC 0.967 -> 0.987, at "
                "no extra cost"})
    reference_blur_sigma: float | None = field(default=0.0, metadata={
        "help": "smoothing of reference matching's cell map, in cells (None: the default, 1)"})
    reference_held_out_profile: bool = field(default=False, metadata={
        "help": "calibrate each reference with the other references' position profile (the screener's "
                "default). Off: the in-sample profile that --score-fusion 0.8 was chosen with; on validation "
                "SynthInspect (seed 4242, 216 images) the held-out profile lowered the fused F1 at 0.5 from "
                "0.954 to 0.933 (0.947 at score fusion 0.7)"})


def run(config: ExportConfig) -> Path:
    """Export, set the answer fields, print what was written; returns the folder."""
    run_dir, out = Path(config.run), Path(config.out)
    if not (run_dir / "config.json").is_file():
        raise InputError(f"--run {run_dir}: no trained model there (no config.json)")
    unknown = set(config.expert_answer_fields) - {"verdict", "boxes"}
    if unknown:
        raise InputError(f"--expert-answer-fields: unknown field(s) {sorted(unknown)}; choose verdict, boxes")
    expert = json.loads((run_dir / "config.json").read_text()).get("expert") or {}
    given = {"score_fusion": config.score_fusion, "map_fusion": config.map_fusion}
    decision = {name: float(value) for name, value in given.items() if value is not None}
    decision["score_views"] = list(config.score_views)
    try:  # the expert's own checks (weights in [0, 1], known views), before anything is written
        ExpertConfig.from_dict({**expert, **decision})
    except ValueError as err:
        raise InputError(f"--score-fusion / --map-fusion / --score-views: {err}") from None
    matching = _reference_matching(config)
    report = default_model.export_parts(run_dir, out)
    corpus = run_dir / lookup.CORPUS_FILE
    if corpus.is_file():  # the training answers the assistant drafts from (`anomaly_assistant.lookup`)
        shutil.copy2(corpus, out / lookup.CORPUS_FILE)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["expert_answer_fields"] = list(config.expert_answer_fields) or None
    cfg["expert"].update(decision)
    cfg["reference_matching"] = matching
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    note(f"{len(report['lowrank'])} low-rank updates, {len(report['full'])} full tensors, "
         f"{len(report['rows'])} row updates; {report['mb']:.1f} MB; largest relative error of a low-rank "
         f"update {report['max_rel_error']:.1e}")
    return out


def _reference_matching(config: ExportConfig) -> dict | None:
    """The checkpoint's reference-matching settings (`ScreenerConfig.from_dict`), or None for the defaults."""
    settings: dict = {}
    if config.reference_image_size is not None:
        settings["image_size"] = config.reference_image_size
    bank = {k: v for k, v in (("patch_size", config.reference_patch_size),
                              ("blur_sigma", config.reference_blur_sigma),
                              ("held_out_profile", config.reference_held_out_profile)) if v is not None}
    if bank:
        settings["bank"] = bank
    try:  # the screener's own checks, before anything is written
        ScreenerConfig.from_dict(settings)
    except ValueError as err:
        flags = "--reference-image-size / --reference-patch-size / --reference-blur-sigma"
        raise InputError(f"{flags}: {err}") from None
    return settings or None
