"""`anomaly-assistant train {expert,sft,grpo,pipeline} --config FILE [overrides]`: wrappers of each `run`.

Each stage has one dataclass config read by the project's one config parser (`commands.config`): `--config`
YAML supplies any option, flags win. Exit codes: 0 done (the final model's folder is printed); 2 a usage
error (an unknown key or flag, a value that cannot work such as a LoRA target that matches no module); 1
unusable input (a missing dataset folder, column or image file). Errors print one line before any step runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from anomaly_assistant.commands.config import parse_config
from anomaly_assistant.commands.runtime import run_command

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
    "bench": ("anomaly_assistant.train.bench", "TrainBenchConfig",
              "SFT and GRPO step time with the expert / without it on one tiny backbone, peak memory"),
}


def main(argv: list[str] | None = None, command: str = "train") -> int:
    """`anomaly-assistant train STAGE ...`; errors print one line and return 2 (usage) or 1 (input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog=PROG, description="Train the chat model, one stage at a time.")
    sub = top.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, _, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"{PROG}: unknown stage {name!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module_name, class_name, _ = STAGES[name]
    prog = f"{PROG} {name}"

    def body() -> int:  # UsageError -> 2, train.common.InputError -> 1, one line each (commands.runtime)
        module = importlib.import_module(module_name)
        config_class = getattr(module, class_name)
        try:
            config = parse_config(config_class, rest, prog, (config_class.__doc__ or "").strip())
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        print(f"saved {module.run(config)}")
        return 0

    return run_command(prog, rest, body)


if __name__ == "__main__":
    sys.exit(main())
