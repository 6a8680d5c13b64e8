"""What `inspect` and `chat` share: model/reference arguments, loading, input checking, output formatting.

The commands stay thin: everything about inspection lives in `AnomalyAssistant` / `ChatSession`; this module
only turns command-line words into library calls and library results into lines a person (or a pipe) can read.

Conventions for both commands:
- stdout carries results only (one line per image, or one JSON object per line with `--json`); notes, progress
  and errors go to stderr. Libraries that print while loading weights are redirected to stderr
  (`quiet_stdout`). `-q` drops the notes, `-v` adds debug logs and tracebacks (`commands.runtime`).
- Bad inputs never crash a run: each is reported and skipped, and the exit code says whether any failed
  (0 ok, 1 some input failed, 2 usage error, 130 interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from anomaly_assistant.commands.config import DEVICE_HELP, resolve_device
from anomaly_assistant.commands.runtime import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    UsageError,
    add_verbosity_arguments,
    load_model,
    note,
)
from anomaly_assistant.finding import Finding
from anomaly_assistant.images import IMAGE_SUFFIXES, ImageError, list_images, load_image
from anomaly_assistant.localize import DEFAULT_THRESHOLD, check_threshold

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "InputError", "UsageError", "note"]

MODEL_HELP = (
    "model to load (default: the embedded default model, SmolLM2-135M + EfficientNet-Lite0, offline): a "
    "Hugging Face hub id, a local checkpoint directory, or `tiny` / `tiny:<family>` "
    "(a small random model built offline, for trying the commands; families: qwen2_5_vl, llava_onevision, "
    "llava)"
)
THRESHOLD_HELP = (
    f"decision threshold on the calibrated score, in [0, 1] (default {DEFAULT_THRESHOLD}: as unusual as the "
    "least typical reference looks to the others); it decides the verdict and the boxes alike: higher flags "
    "fewer parts"
)
REFERENCES_HELP = (
    "known-good reference images of the same part: a directory and/or files. It takes every path that "
    "follows it, so put IMAGE... first or end the list with `--`"
)


class CommandParser(argparse.ArgumentParser):
    """argparse with the config parser's rules: a usage error is one line (exit 2), `-q` / `-v` everywhere."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        add_verbosity_arguments(self)

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see --help)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --references, --device, --max-new-tokens, --threshold: shared by the inspecting commands."""
    parser.add_argument("--model", metavar="PATH_OR_ID", help=MODEL_HELP)
    parser.add_argument(
        "--references", metavar="PATH", nargs="+", action="extend", default=[], help=REFERENCES_HELP
    )
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="longest answer the model may generate (default: the assistant's setting)",
    )
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T", help=THRESHOLD_HELP
    )


def threshold_of(args: argparse.Namespace) -> float:
    """The --threshold value; UsageError (exit 2) when it is not in [0, 1], before anything loads."""
    try:
        return check_threshold(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be a calibrated score in [0, 1], got {args.threshold}") from None


def warn(message: str) -> None:
    """An error or warning about one input: stderr, shown even with `-q` (the exit code reflects it)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what libraries print while loading weights to stderr: stdout stays machine-readable."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@dataclass
class Loaded:
    """One input after loading: the image, or the reason it could not be read."""

    path: Path
    image: Image.Image | None = None
    error: str | None = None


def expand_images(path: Path, recursive: bool = False) -> list[Path]:
    """The images of a directory (sorted; with `recursive`, of every folder below it), or the path itself."""
    if not (recursive and path.is_dir()):
        return list_images(path)
    return sorted(q for q in path.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())


def load_inputs(paths: Sequence[str | Path], recursive: bool = False) -> list[Loaded]:
    """Expand files and directories (in the order given) and load each image.

    Unreadable, empty or missing inputs come back with an `error` instead of raising. A directory without
    images is an error too (likely a wrong path); without `recursive`, the error says when its subfolders hold
    images.
    """
    out = []
    for raw in paths:
        p = Path(raw)
        expanded = expand_images(p, recursive)
        if p.is_dir() and not expanded:
            nested = not recursive and next(
                (q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES), None
            )
            hint = " (its subfolders do: add --recursive)" if nested else ""
            out.append(Loaded(p, error=f"{p}: directory has no images{hint}"))
        for path in expanded:
            try:
                out.append(Loaded(path, image=load_image(path)))
            except ImageError as exc:
                out.append(Loaded(path, error=str(exc)))
    return out


def load_assistant(
    model: str | None,
    device: str = "auto",
    max_new_tokens: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    expert_only: bool = False,
    expert: str | None = None,
) -> Any:
    """An expert-only assistant, or `AnomalyAssistant.from_pretrained(model)` (None: the default model).

    Raises InputError (exit 1) when the model cannot be loaded: a missing folder, a hub id without network (at
    once in offline mode, else after one request), a checkpoint of an unsupported family, the default model's
    package not installed (the message has the install command).
    """
    from anomaly_assistant.assistant import AnomalyAssistant

    if expert_only or expert:
        try:
            return AnomalyAssistant.expert_only(threshold=threshold, expert=expert)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"could not load the fitted expert {expert!r}: {exc}") from exc
    assistant = load_model(model, resolve_device(device),
                           "screen without a model: --expert-only --references DIR", threshold=threshold)
    if max_new_tokens is not None:
        assistant.generation.max_new_tokens = max_new_tokens
    return assistant


def fit_screener(assistant: Any, references: Sequence[Image.Image]) -> Any:
    """The assistant's reference screener over already loaded references (weights load quietly)."""
    with quiet_stdout():
        return assistant.reference_screener(list(references))


# ------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------
def _fmt_box(box: Any) -> str:
    x1, y1, x2, y2 = box.as_list()
    return f"({x1:.0f},{y1:.0f})-({x2:.0f},{y2:.0f})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


# What `Finding.map_source` means, for a person (the JSON output keeps the tag itself).
_MAP_SOURCES = {
    "reference": "compared with {refs}",
    "ltfm": "judged by the trained expert",
    "ltfm+reference": "judged by the trained expert and compared with {refs}",
}


def _map_source_in_words(map_source: str, references: int | None) -> str:
    if map_source not in _MAP_SOURCES:  # e.g. a fitted expert's own description
        return f"map source: {map_source}"
    refs = _plural(references, "reference image") if references else "the reference images"
    return _MAP_SOURCES[map_source].format(refs=refs)


def format_finding(finding: Finding, name: str | None = None, references: int | None = None) -> str:
    """One line a person reads: image, verdict, score, regions, defect type, rationale, then caveats.

    e.g. `scratch.png  ANOMALOUS  score 0.812  1 region: (40,48)-(120,104)  compared with 3 reference images`.
    Coordinates are pixels of the original image, (left,top)-(right,bottom).
    """
    name = name or finding.image_path or "<image>"
    parts = [
        name,
        f"{finding.verdict.upper():9s}",
        "score -" if finding.score is None else f"score {finding.score:.3f}",
    ]
    if finding.boxes:
        parts.append(
            f"{_plural(len(finding.boxes), 'region')}: " + " ".join(_fmt_box(b) for b in finding.boxes)
        )
    elif finding.is_anomalous:
        parts.append("no region marked")
    if finding.defect_type:
        parts.append(f"defect: {finding.defect_type}")
    if finding.rationale:
        parts.append(f"why: {' '.join(finding.rationale.split())}")
    notes = list(finding.notes)
    if finding.map_source and finding.source == "expert":  # the verdict came from the map: say whose map
        notes.insert(0, _map_source_in_words(finding.map_source, references))
    if references and not any("reference" in n for n in notes):  # a model's verdict: no map words above
        notes.append(f"compared with {_plural(references, 'reference image')}")
    parts.extend(notes)
    if finding.parse_error:  # the details are in --json's parse_error
        parts.append(
            "(the model's answer was not in the inspection format: verdict from the expert)"
            if finding.source == "expert"
            else "(the model's answer was not fully in the inspection format)"
        )
    return "  ".join(parts)


def json_line(obj: Any) -> str:
    r"""One JSON object on one line, whatever the text holds.

    Besides \n (always escaped by json), the Unicode line separators that `str.splitlines` and some readers
    split on (U+0085, U+2028, U+2029) are escaped too; other text stays readable.
    """
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def finding_record(finding: Finding, **extra: Any) -> dict[str, Any]:
    """The JSON-lines object for one image: `Finding.to_json` without the (large) map, plus `extra` keys."""
    return finding.to_json(include_map=False) | extra


def unique_path(directory: Path, stem: str, suffix: str, taken: set[Path]) -> Path:
    """directory/stem+suffix, or stem-2, stem-3, ... when this run already wrote that name.

    The same file name can come from two folders; files from earlier runs are overwritten. Adds the result
    to `taken`.
    """
    path, n = directory / f"{stem}{suffix}", 1
    while path in taken:
        n += 1
        path = directory / f"{stem}-{n}{suffix}"
    taken.add(path)
    return path
