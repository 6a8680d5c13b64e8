"""`anomaly-assistant chat IMAGE [--model PATH_OR_ID] [--references PATH...]`: inspect, then talk about it.

Runs an inspection first and prints the Finding, then reads questions from stdin line by line (prompt "> "
when stdin is a terminal; a pipe works the same, which is how scripts and tests drive it) and streams each
answer. Every question sees the whole conversation. Commands: /finding (the last Finding as JSON), /reset
(forget the conversation, keep image and references), /help, /quit (or end of input).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, TextIO

from anomaly_assistant.commands._common import (
    EXIT_OK,
    CommandParser,
    InputError,
    UsageError,
    add_model_arguments,
    finding_record,
    format_finding,
    json_line,
    load_assistant,
    load_inputs,
    quiet_stdout,
    threshold_of,
    warn,
)
from anomaly_assistant.commands.runtime import run_command

COMMANDS_HELP = (
    "/finding  print the last Finding as JSON\n/reset    start the conversation over (same image)\n"
    "/help     this list\n/quit     leave (end of input does the same)"
)


def build_parser(prog: str = "anomaly-assistant chat") -> argparse.ArgumentParser:
    """The chat command line (one image, the model options, -q / -v)."""
    parser = CommandParser(
        prog=prog,
        description="Inspect one image, then ask follow-up questions about it (multi-turn).",
        epilog="in-chat commands:\n"
        + COMMANDS_HELP
        + "\n\nexample:\n  printf 'What is the defect?\\n/quit\\n' | "
        "anomaly-assistant chat part.png --references good/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="the image to inspect and talk about")
    add_model_arguments(parser)
    return parser


def _start(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load inputs and the model, run the first inspection; returns (session, finding)."""
    threshold = threshold_of(args)
    if Path(args.image).is_dir():
        raise UsageError(f"{args.image} is a directory: chat talks about one image file")
    (item,) = load_inputs([args.image])
    if item.error:
        raise InputError(item.error)
    references = load_inputs(args.references)
    for ref in references:
        if ref.error:
            warn(f"reference skipped: {ref.error}")
    ref_images = [r.image for r in references if r.image is not None]
    if args.references and not ref_images:
        raise UsageError("none of the --references could be read as images")
    assistant = load_assistant(args.model, args.device, args.max_new_tokens, threshold)
    with quiet_stdout():
        session = assistant.chat(references=ref_images or None, image=item.image)
        session.image_source = str(item.path)
        finding = session.inspect()
    finding.image_path = str(item.path)
    return session, finding


def converse(session: Any, finding: Any, stdin: TextIO, stdout: TextIO) -> None:
    """The read-answer loop: one question per line until /quit or end of input."""
    interactive = stdin.isatty()
    use_input = interactive and stdin is sys.stdin and stdout is sys.stdout
    if use_input:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    while True:
        if use_input:
            try:
                line = input("> ")
            except EOFError:  # Ctrl-D
                stdout.write("\n")
                break
        else:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = stdin.readline()
            if not line:  # end of input
                break
        question = line.strip()
        if not question:
            continue
        if question in ("/quit", "/exit"):
            break
        if question == "/help":
            print(COMMANDS_HELP, file=stdout, flush=True)
        elif question == "/finding":
            print(json_line(finding_record(finding)), file=stdout, flush=True)
        elif question == "/reset":
            session.reset()
            print("(conversation reset; the image and references stay)", file=stdout, flush=True)
        elif question.startswith("/"):
            warn(f"unknown command {question.split()[0]!r}; /help lists the commands")
        else:
            try:
                for piece in session.stream(question):
                    stdout.write(piece)
                    stdout.flush()
            except ValueError as exc:
                warn(f"error: {exc}")
            stdout.write("\n")
            stdout.flush()


def main(argv: list[str] | None = None, command: str = "chat") -> int:
    """`anomaly-assistant chat ...`: exit 0 done, 1 the image or model cannot be used, 2 usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"anomaly-assistant {command}"

    def body() -> int:
        args = build_parser(prog).parse_args(argv)
        session, finding = _start(args)
        print(format_finding(finding, references=len(session.references)), flush=True)
        converse(session, finding, sys.stdin, sys.stdout)
        return EXIT_OK

    return run_command(prog, argv, body)


if __name__ == "__main__":
    sys.exit(main())
