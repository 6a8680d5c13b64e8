"""What `inspect` and `chat` share: model/reference arguments, loading, input checking, output formatting.

The commands stay thin: everything about inspection lives in `AnomalyAssistant` / `ChatSession`; this module only
turns command-line words into library calls and library results into lines a person (or a pipe) can read.

Conventions for both commands:
- stdout carries results only (one line per image, or one JSON object per line with `--json`); notes, progress and
  errors go to stderr. Libraries that print while loading weights are redirected to stderr (`quiet_stdout`).
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

import numpy as np
from PIL import Image, ImageDraw

from anomaly_assistant.commands.config import DEVICE_HELP, UsageError, resolve_device
from anomaly_assistant.finding import Finding
from anomaly_assistant.images import ImageError, list_images, load_image
from anomaly_assistant.localize import DEFAULT_THRESHOLD, check_threshold

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

MODEL_HELP = (
    "model to load: a Hugging Face hub id, a local checkpoint directory, or `tiny` / `tiny:<family>` "
    "(a small random model built offline, for trying the commands; families: qwen2_5_vl, llava_onevision, llava)"
)
THRESHOLD_HELP = (
    f"decision threshold on the calibrated score, in [0, 1] (default {DEFAULT_THRESHOLD}: as unusual as the "
    "least typical reference looks to the others); it decides the verdict and the boxes alike: higher flags "
    "fewer parts"
)
REFERENCES_HELP = (
    "known-good reference images of the same part: a directory and/or files. It takes every path that follows "
    "it, so put IMAGE... first or end the list with `--`"
)


class InputError(Exception):
    """An input image that cannot be read, where the command cannot go on without it (exit code 1)."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --references, --device, --max-new-tokens, --threshold: shared by the inspecting commands."""
    parser.add_argument("--model", metavar="PATH_OR_ID", help=MODEL_HELP)
    parser.add_argument("--references", metavar="PATH", nargs="+", action="extend", default=[], help=REFERENCES_HELP)
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="longest answer the model may generate (default: the assistant's setting)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T",
                        help=THRESHOLD_HELP)


def threshold_of(args: argparse.Namespace) -> float:
    """The --threshold value; UsageError (exit 2) when it is not in [0, 1], before anything loads."""
    try:
        return check_threshold(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be a calibrated score in [0, 1], got {args.threshold}") from None


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send anything printed while loading (weight-loading chatter) to stderr, so stdout stays machine-readable."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@dataclass
class Loaded:
    """One input after loading: the image, or the reason it could not be read."""

    path: Path
    image: Image.Image | None = None
    error: str | None = None


def load_inputs(paths: Sequence[str | Path]) -> list[Loaded]:
    """Expand files and directories (in the order given) and load each image; unreadable, empty or missing inputs
    come back with an `error` instead of raising. A directory without images is an error too (likely a wrong path).
    """
    out = []
    for raw in paths:
        p = Path(raw)
        expanded = list_images(p)
        if p.is_dir() and not expanded:
            out.append(Loaded(p, error=f"{p}: directory has no images"))
        for path in expanded:
            try:
                out.append(Loaded(path, image=load_image(path)))
            except ImageError as exc:
                out.append(Loaded(path, error=str(exc)))
    return out


def load_assistant(model: str | None, device: str = "auto", max_new_tokens: int | None = None,
                   threshold: float = DEFAULT_THRESHOLD) -> Any:
    """`AnomalyAssistant.from_pretrained(model)`, or an expert-only assistant when `model` is None.

    Raises UsageError when the model cannot be loaded (wrong id, no network for a hub id, not a supported family).
    """
    from anomaly_assistant.assistant import AnomalyAssistant

    if model is None:
        return AnomalyAssistant.expert_only(threshold=threshold)
    device = resolve_device(device)
    try:
        with quiet_stdout():
            assistant = AnomalyAssistant.from_pretrained(model, device=device, threshold=threshold)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"could not load model {model!r}: {exc}") from exc
    if max_new_tokens is not None:
        assistant.generation.max_new_tokens = max_new_tokens
    return assistant


def fit_screener(assistant: Any, references: Sequence[Image.Image]) -> Any:
    """The assistant's reference screener over already loaded references (weights load quietly)."""
    with quiet_stdout():
        return assistant.reference_screener(list(references))


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def _fmt_box(box: Any) -> str:
    return "[" + ",".join(f"{v:.0f}" for v in box.as_list()) + "]"


def format_finding(finding: Finding, name: str | None = None) -> str:
    """One readable line: image, verdict, score, boxes, defect type, rationale, notes."""
    name = name or finding.image_path or "<image>"
    score = "-" if finding.score is None else f"{finding.score:.3f}"
    boxes = " ".join(_fmt_box(b) for b in finding.boxes) or "-"
    parts = [f"{name}: {finding.verdict.upper():9s}", f"score {score}", f"boxes {boxes}",
             f"type {finding.defect_type or '-'}"]
    if finding.rationale:
        parts.append(f"rationale: {' '.join(finding.rationale.split())}")
    if finding.parse_error:
        parts.append(f"parse error: {finding.parse_error}")
    if finding.notes:
        parts.append(f"notes: {'; '.join(finding.notes)}")
    return "  ".join(parts)


def json_line(obj: Any) -> str:
    """One JSON object on one line: besides \\n (always escaped by json), the Unicode line separators that
    `str.splitlines` and some readers split on (U+0085, U+2028, U+2029) are escaped too; other text stays readable."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def finding_record(finding: Finding, **extra: Any) -> dict[str, Any]:
    """The JSON-lines object for one image: `Finding.to_json` without the (large) map, plus `extra` keys."""
    return finding.to_json(include_map=False) | extra


def unique_path(directory: Path, stem: str, suffix: str, taken: set[Path]) -> Path:
    """directory/stem+suffix, or stem-2, stem-3, ... when this run already wrote that name (same file name in two
    folders); files from earlier runs are overwritten. Adds the result to `taken`."""
    path, n = directory / f"{stem}{suffix}", 1
    while path in taken:
        n += 1
        path = directory / f"{stem}-{n}{suffix}"
    taken.add(path)
    return path
