"""`anomaly-assistant train {expert,sft,grpo,pipeline,export-default,bench} ...`: wrappers of each `run`.

Each stage has one dataclass config read by the project's one config parser (`commands.config`): `--config`
YAML supplies any option, flags win. Exit codes: 0 done (the final model's folder is printed); 2 a usage
error (an unknown key or flag, a value that cannot work such as a LoRA target that matches no module); 1
unusable input (a missing dataset folder, column or image file). Errors print one line before any step runs.
"""

from __future__ import annotations

import importlib
import sys

from anomaly_assistant.commands.config import parse_config
from anomaly_assistant.commands.runtime import dispatch

PROG = "anomaly-assistant train"

# stage -> (module with `run(config) -> Path`, its config class name, one-line help)
STAGES: dict[str, tuple[str, str, str]] = {
    "expert": ("anomaly_assistant.train.expert", "ExpertStageConfig",
               "stage 1: the anomaly expert (LTFM + score head) on the expert export, feature source frozen"),
    "sft": ("anomaly_assistant.train.sft", "SftStageConfig",
            "stage 2: supervised fine-tuning on the SFT export (LoRA, QLoRA or full)"),
    "grpo": ("anomaly_assistant.train.grpo", "GrpoStageConfig",
             "stage 3: GRPO on the GRPO export with the verifiable rewards of train.rewards"),
    "pipeline": ("anomaly_assistant.train.pipeline", "PipelineConfig",
                 "data build -> stage 1 -> SFT -> GRPO into one folder with a model card (resumable)"),
    "export-default": ("anomaly_assistant.train.export_default", "ExportConfig",
                       "the shipped parts of a trained default model (<= 30 MB) into the package"),
    "bench": ("anomaly_assistant.train.bench", "TrainBenchConfig",
              "SFT and GRPO step time with the expert / without it on one tiny backbone, peak memory"),
}


def main(argv: list[str] | None = None, command: str = "train") -> int:
    """`anomaly-assistant train STAGE ...`; errors print one line and return 2 (usage) or 1 (input)."""

    def run_one(name: str, rest: list[str]) -> int:  # UsageError -> 2, InputError -> 1 (commands.runtime)
        module_name, class_name, _ = STAGES[name]
        module = importlib.import_module(module_name)
        config_class = getattr(module, class_name)
        try:
            config = parse_config(config_class, rest, f"{PROG} {name}", (config_class.__doc__ or "").strip())
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        print(f"saved {module.run(config)}")
        return 0

    helps = {name: help_text for name, (_, _, help_text) in STAGES.items()}
    argv = sys.argv[1:] if argv is None else argv
    return dispatch(argv, PROG, "Train the chat model, one stage at a time.", helps, run_one, noun="stage")
