"""`anomaly-assistant inspect IMAGE... [--model PATH_OR_ID] [--references PATH...] [--expert-only] [--json]`.

Prints one Finding per image. With a model, the language model answers in the inspection grammar (verdict,
boxes, defect type, rationale) and the expert supplies score and map. With `--expert-only` (or no `--model`
but `--references`) no language model is loaded at all: pretrained EfficientNet-Lite0 patch features are
matched against the references (training-free), which gives verdict, calibrated score, map and boxes on a
laptop right after install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomaly_assistant.commands._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandParser,
    InputError,
    Loaded,
    UsageError,
    add_model_arguments,
    finding_record,
    fit_screener,
    format_finding,
    json_line,
    load_assistant,
    load_inputs,
    note,
    quiet_stdout,
    threshold_of,
    unique_path,
    warn,
)
from anomaly_assistant.commands.runtime import is_quiet, run_command
from anomaly_assistant.finding import Finding
from anomaly_assistant.overlay import render_overlay

EXAMPLES = """examples:
  anomaly-assistant inspect part.png --references good/            # the embedded default model
  anomaly-assistant inspect part.png --expert-only --references good/   # expert only: fast, no rationale
  anomaly-assistant inspect test/ --expert my-part-expert/         # an expert fitted by `expert fit`
  anomaly-assistant inspect test/ --model DIR_OR_HUB_ID --json     # another model; JSON lines
  anomaly-assistant inspect --expert-only --save-maps maps/ --references good/ -- test/
  anomaly-assistant inspect -q --recursive --references bottle/train/good -- bottle/test   # MVTec layout

exit codes: 0 all images inspected, 1 some input could not be read or inspected, 2 usage error,
130 interrupted"""


def build_parser(prog: str = "anomaly-assistant inspect") -> argparse.ArgumentParser:
    """The inspect command line: images, model and reference options, output options, -q / -v."""
    parser = CommandParser(
        prog=prog,
        description="Inspect images: verdict, score, boxes, defect type and rationale per image.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files and/or directories (their images; with --recursive, every folder below)",
    )
    parser.add_argument(
        "--recursive",
        "-r",
        action="store_true",
        help="descend into the folders given as IMAGE (e.g. an MVTec test/ folder of defect types)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, usually one per core)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--expert-only",
        action="store_true",
        help="no language model (fast): match pretrained EfficientNet-Lite0 features against --references; "
        "verdict, score, map and boxes, no rationale",
    )
    parser.add_argument(
        "--expert",
        metavar="EXPERT_DIR",
        help="screen with the expert alone, fitted to this part by `anomaly-assistant expert fit` (it "
        "remembers its references and calibration: no --references needed)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per image on stdout (Finding keys; {image, error} on failure)",
    )
    parser.add_argument(
        "--save-maps",
        metavar="DIR",
        type=Path,
        help="write each anomaly map as a heatmap overlay PNG with boxes into DIR",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="images per batched generation / screening step (default 8)",
    )
    return parser


def choose_mode(args: argparse.Namespace) -> str:
    """'model' or 'expert'; raises UsageError saying what to pass when the command line cannot work."""
    if not args.images:
        hint = (
            " (--references takes every path after it: put IMAGE... first, or end the references with `--`)"
            if args.references
            else ""
        )
        raise UsageError(f"no IMAGE given: pass image files or directories to inspect{hint}")
    if args.model and (args.expert_only or args.expert):
        raise UsageError("--expert-only / --expert screen without a model: drop --model, or drop them")
    if args.expert:
        if not (Path(args.expert) / "fit.json").is_file():  # expert.fitted.FIT_NAME
            raise InputError(
                f"--expert {args.expert}: not a folder written by `anomaly-assistant expert fit` "
                "(no fit.json)"
            )
        return "expert"
    if args.expert_only and not args.references:
        raise UsageError("--expert-only needs --references DIR_OR_FILES (known-good images of the same part)")
    return "expert" if args.expert_only else "model"


def _chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    n = max(1, n)
    return [items[i : i + n] for i in range(0, len(items), n)]


class Inspector:
    """Runs the assistant over loaded images in chunks; a chunk that fails is retried image by image."""

    def __init__(self, assistant: Any, references: list[Any], batch_size: int):
        self.assistant, self.references, self.batch_size = assistant, references, batch_size
        self.screener = None
        if references and not assistant.has_llm:
            note(f"fitting the expert to {len(references)} reference image{'s' * (len(references) != 1)} ...")
            self.screener = fit_screener(assistant, references)

    def _run(self, images: list[Any]) -> list[Finding]:
        with quiet_stdout():  # the reference screener loads its weights lazily inside inspect_batch
            if self.assistant.has_llm:
                return self.assistant.inspect_batch(images, references=self.references or None)
            return self.assistant.screen(images, screener=self.screener)

    def __call__(self, items: list[Loaded]):
        """Yield (item, finding or None, error or None) in input order."""
        for chunk in _chunks(items, self.batch_size):
            try:
                results = [(item, f, None) for item, f in zip(chunk, self._run([it.image for it in chunk]))]
            except Exception as exc:  # noqa: BLE001 - isolate the image that breaks, report it, keep going
                if len(chunk) == 1:
                    results = [
                        (chunk[0], None, f"{chunk[0].path}: inspection failed ({type(exc).__name__}: {exc})")
                    ]
                else:
                    results = [r for item in chunk for r in self([item])]
            yield from results


def run(args: argparse.Namespace) -> int:
    """Inspect every readable input; 0 when all were inspected, 1 when any failed (each reported)."""
    threshold = threshold_of(args)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    mode = choose_mode(args)
    if args.threads is not None:
        from anomaly_assistant.expert.sources import set_intra_op_threads

        set_intra_op_threads(args.threads)  # process-wide: once, before anything runs
    failures = 0
    references = load_inputs(args.references, args.recursive)
    for ref in references:
        if ref.error:
            failures += 1
            warn(f"reference skipped: {ref.error}")
    ref_images = [r.image for r in references if r.image is not None]
    if args.references and not ref_images:
        raise UsageError("none of the --references could be read as images")

    def report_error(path: Path, message: str) -> None:
        warn(f"error: {message}")
        if args.json:
            print(json_line({"image": str(path), "error": message}), flush=True)

    items = load_inputs(args.images, args.recursive)
    for item in items:  # unreadable inputs are reported at once, before the (slow) model loads
        if item.error:
            failures += 1
            report_error(item.path, item.error)
    todo = [it for it in items if it.error is None]
    if todo:  # nothing readable: no reason to load a model
        assistant = load_assistant(
            args.model, args.device, args.max_new_tokens, threshold, expert_only=mode == "expert",
            expert=args.expert,
        )
        inspector = Inspector(assistant, ref_images, args.batch_size)
        note(f"inspecting {len(todo)} image{'s' * (len(todo) != 1)} ...")
    if args.save_maps:
        args.save_maps.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    width = max((len(str(it.path)) for it in todo), default=0)
    n_done = n_anomalous = 0

    for item, finding, error in inspector(todo) if todo else []:
        if error:
            failures += 1
            report_error(item.path, error)
            continue
        finding.image_path = str(item.path)
        n_done += 1
        n_anomalous += finding.is_anomalous
        extra = {}
        if args.save_maps:
            if finding.anomaly_map is None:
                warn(f"{item.path}: no anomaly map to save")
            else:
                out = unique_path(args.save_maps, item.path.stem + "_map", ".png", written)
                render_overlay(item.image, finding, threshold).save(out)
                extra["map_path"] = str(out)
        if args.json:
            print(json_line(finding_record(finding, **extra)), flush=True)
        else:
            name = str(item.path).ljust(width)  # names padded to one width: the verdicts line up
            print(format_finding(finding, name, references=len(ref_images)), flush=True)

    n_normal = n_done - n_anomalous
    summary = f"{n_done} image{'s' * (n_done != 1)} inspected: {n_anomalous} anomalous, {n_normal} normal"
    if failures:
        summary += f"; {failures} input{'s' * (failures != 1)} failed"
    if not is_quiet():  # -q: the per-image results only
        print(summary, file=sys.stderr if args.json else sys.stdout, flush=True)
    return EXIT_FAILED if failures else EXIT_OK


def main(argv: list[str] | None = None, command: str = "inspect") -> int:
    """`anomaly-assistant inspect ...`: exit 0 all inspected, 1 an input failed, 2 usage error, 130 Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"anomaly-assistant {command}"
    return run_command(prog, argv, lambda: run(build_parser(prog).parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
