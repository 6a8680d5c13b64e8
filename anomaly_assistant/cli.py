"""`anomaly-assistant` entry point.

The one place that imports the packages around the library (data_builders, train, serve, eval),
and only lazily inside each sub-command so `anomaly-assistant --help` stays fast. Each sub-command
module exposes `main(argv: list[str] | None) -> int` and owns its own argument parser.
Sub-commands whose module is not part of this version are neither advertised nor accepted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from functools import cache

# sub-command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": (
        "anomaly_assistant.commands.inspect",
        "inspect images: verdict, score, boxes, rationale (Finding per image)",
    ),
    "chat": ("anomaly_assistant.commands.chat", "interactive multi-turn chat about one image"),
    "demo": ("anomaly_assistant.serve.cli", "start the inspector UI on bundled samples"),
    "serve": ("anomaly_assistant.serve.cli", "start the inspector UI and HTTP API"),
    "data": ("anomaly_assistant.data_builders.cli", "build and inspect training/evaluation data"),
    "train": ("anomaly_assistant.train.cli", "train the expert (stage 1), SFT (stage 2), GRPO (stage 3)"),
    "expert": ("anomaly_assistant.train.expert_fit", "fit the expert to one part from a few good images"),
    "eval": ("anomaly_assistant.eval.cli", "evaluate: AD metrics, detection, reasoning, MMAD"),
    "bench": ("anomaly_assistant.eval.bench", "speed and memory benchmark"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anomaly-assistant")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


@cache
def available_commands() -> dict[str, tuple[str, str]]:
    """The sub-commands this version ships: those whose module exists (found without importing it)."""
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-assistant",
        description="Visual inspection with a multimodal LLM and an anomaly expert.",
        epilog="Run `anomaly-assistant COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"anomaly-assistant {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in available_commands().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `anomaly-assistant COMMAND ...`: hand the remaining arguments to that sub-command's `main`.

    The sub-command's module is imported only once it is chosen, so `--help` and `--version` stay fast.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        parser.parse_args(argv[:1])  # prints the version and exits 0
    verbosity = []  # `anomaly-assistant -q COMMAND ...` works like `anomaly-assistant COMMAND -q ...`
    while argv and argv[0] in ("-q", "--quiet", "-v", "--verbose"):
        verbosity.append(argv.pop(0))
    if not argv:
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    cut = rest.index("--") if "--" in rest else len(rest)  # after the sub-command's own words, before `--`
    rest = [*rest[:cut], *verbosity, *rest[cut:]]
    commands = available_commands()
    if name not in commands:  # one line, exit 2, like every command's usage errors
        print(f"anomaly-assistant: unknown command {name!r}; choose from {', '.join(commands)} (see --help)",
              file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(commands[name][0])
    # serve/demo and eval/bench share modules: the sub-command name tells them which.
    return int(module.main(rest, command=name) or 0)


if __name__ == "__main__":
    sys.exit(main())
