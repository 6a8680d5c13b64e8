"""The answer grammar: `<think>…</think><answer>{json}</answer>`.

One format for SFT targets, GRPO rewards, parsing, the UI and evaluation. `render_answer` writes it;
`parse_answer` reads it back from any text a model may produce and NEVER raises: what it could not
understand is listed in `ParsedAnswer.problems`, and `ParsedAnswer.ok` says whether the text followed
the grammar closely enough to trust (the format reward and the fallback to the expert both use it).

Boxes inside the JSON are in the backbone's model-input pixel frame; pass a `Frame` to get them in
original image pixels.

>>> text = render_answer("A dark line crosses the top.", "anomalous", "scratch", [[10, 4, 60, 12]],
...                      "thin scratch")
>>> parse_answer(text).verdict, parse_answer(text).boxes[0].as_list()
('anomalous', [10.0, 4.0, 60.0, 12.0])
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from anomaly_assistant.finding import Box, Frame
from anomaly_assistant.scoring import format_ok, verdict_word

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
REQUIRED_KEYS = ("verdict", "defect_type", "boxes", "rationale")
MAX_BOXES = 64  # more than this is degenerate model output, not a finding
_MAX_TEXT = 200_000  # parse at most this many characters (bounded work on adversarial input)


@dataclass
class ParsedAnswer:
    """What `parse_answer` understood. `ok` is True only for text that follows the grammar exactly."""

    verdict: str | None = None
    defect_type: str | None = None
    boxes: list[Box] = field(default_factory=list)
    rationale: str = ""
    think: str = ""
    problems: list[str] = field(default_factory=list)
    has_answer_block: bool = False
    json_ok: bool = False

    @property
    def ok(self) -> bool:
        return format_ok(self)


def render_answer(
    think: str,
    verdict: str,
    defect_type: str | None = None,
    boxes: Sequence[Sequence[float]] | Sequence[Box] = (),
    rationale: str = "",
) -> str:
    """Write an inspection answer. Boxes are in the model-input frame; integers are written as integers."""
    if verdict not in ("normal", "anomalous"):
        raise ValueError(f"verdict must be 'normal' or 'anomalous', got {verdict!r}")
    if verdict == "normal":
        boxes, defect_type = (), None
    payload = {
        "verdict": verdict,
        "defect_type": _strip_tags(defect_type) if defect_type is not None else None,
        "boxes": [_box_numbers(b) for b in boxes],
        "rationale": _strip_tags(rationale),
    }
    return (
        f"{THINK_OPEN}{_strip_tags(think).strip()}{THINK_CLOSE}\n"
        f"{ANSWER_OPEN}{json.dumps(payload, ensure_ascii=False)}{ANSWER_CLOSE}"
    )


def _strip_tags(text: str) -> str:
    """Remove grammar tags from free text so a rendered answer always parses back to itself."""
    previous = None
    while previous != text:
        previous = text
        for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
            text = text.replace(tag, "")
    return text


def _box_numbers(box: Sequence[float] | Box) -> list[float | int]:
    values = box.as_list() if isinstance(box, Box) else list(box)
    if len(values) != 4:
        raise ValueError(f"a box has 4 numbers, got {values!r}")
    return [int(v) if float(v).is_integer() else round(float(v), 2) for v in values]


def _between(text: str, open_tag: str, close_tag: str) -> tuple[str | None, bool]:
    """Content of the LAST open_tag…close_tag pair (or of an unclosed open_tag), and whether it was closed."""
    start = text.rfind(open_tag)
    if start < 0:
        return None, False
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        return text[start:], False
    return text[start:end], True


def _first_json_object(text: str, max_starts: int = 32) -> str | None:
    """The first balanced {...} in text (string-aware), or None.

    Tries at most `max_starts` opening braces so adversarial input ("{{{{…") stays linear-ish.
    """
    start = text.find("{")
    tries = 0
    while start >= 0 and tries < max_starts:
        tries += 1
        depth, in_str, escape = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def _normalise_verdict(value: Any, problems: list[str]) -> str | None:
    if isinstance(value, bool):
        return "anomalous" if value else "normal"
    if not isinstance(value, str):
        problems.append(f"verdict is not a string: {value!r}"[:200])
        return None
    verdict = verdict_word(value)
    if verdict is None:
        problems.append(f"unknown verdict {value!r}"[:200])
    elif value.strip().lower().strip(".!") != verdict:
        problems.append(f"verdict {value!r} is not one of normal/anomalous"[:200])
    return verdict


def _to_box(item: Any) -> Box | None:
    label = None
    if isinstance(item, dict):
        label = item.get("label") if isinstance(item.get("label"), str) else None
        item = item.get("bbox_2d", item.get("box", item.get("bbox")))
    if not isinstance(item, (list, tuple)) or len(item) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in item)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    return Box(x1, y1, x2, y2, label)


def _parse_boxes(value: Any, problems: list[str]) -> list[Box]:
    if value is None:
        return []
    if (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) for v in value)):
        value = [value]  # a single bare box
    if not isinstance(value, (list, tuple)):
        problems.append("boxes is not a list")
        return []
    boxes: list[Box] = []
    for item in value[:MAX_BOXES]:
        box = _to_box(item)
        if box is None:
            problems.append(f"invalid box {item!r}"[:200])
        else:
            boxes.append(box)
    if len(value) > MAX_BOXES:
        problems.append(f"more than {MAX_BOXES} boxes; the rest were dropped")
    return boxes


def parse_answer(text: Any, frame: Frame | None = None) -> ParsedAnswer:
    """Read an inspection answer from model text. Never raises.

    With `frame`, boxes are converted from the model-input frame to original image pixels and
    clipped to the image; degenerate (zero-area) boxes are dropped with a recorded problem.
    """
    out = ParsedAnswer()
    try:
        _parse_into(out, text, frame)
    except Exception as exc:  # the contract is "never raises": record the surprise instead
        out.problems.append(f"internal parser error: {type(exc).__name__}")
    return out


def _parse_into(out: ParsedAnswer, text: Any, frame: Frame | None) -> None:
    if not isinstance(text, str):
        out.problems.append(f"expected text, got {type(text).__name__}")
        return
    if len(text) > _MAX_TEXT:
        out.problems.append(f"text longer than {_MAX_TEXT} characters was truncated")
        text = text[:_MAX_TEXT]

    think, think_closed = _between(text, THINK_OPEN, THINK_CLOSE)
    if think is None:
        out.problems.append("missing <think> block")
    elif not think_closed:
        out.problems.append("unclosed <think> block")
    out.think = (think or "").strip()
    if not think_closed and think is not None and ANSWER_OPEN in think:
        out.think = think[: think.find(ANSWER_OPEN)].strip()

    answer, answer_closed = _between(text, ANSWER_OPEN, ANSWER_CLOSE)
    if answer is None:
        out.problems.append("missing <answer> block")
        answer = text  # still try to salvage a JSON object from free text
    else:
        out.has_answer_block = True
        if not answer_closed:
            out.problems.append("unclosed <answer> block")

    blob = _first_json_object(answer)
    if blob is None:
        out.problems.append("no JSON object in the answer")
        return
    try:
        data = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        out.problems.append(f"answer JSON does not parse: {exc}"[:200])
        return
    if not isinstance(data, dict):
        out.problems.append("answer JSON is not an object")
        return
    out.json_ok = out.has_answer_block
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        out.problems.append(f"missing keys: {', '.join(missing)}")

    out.verdict = _normalise_verdict(data.get("verdict"), out.problems)
    defect_type = data.get("defect_type")
    if defect_type is not None and not isinstance(defect_type, str):
        out.problems.append("defect_type is not a string or null")
        defect_type = str(defect_type)[:100]
    out.defect_type = defect_type.strip() or None if isinstance(defect_type, str) else None
    rationale = data.get("rationale", "")
    out.rationale = rationale if isinstance(rationale, str) else json.dumps(rationale)[:2000]
    boxes = _parse_boxes(data.get("boxes"), out.problems)

    if out.verdict == "normal" and (boxes or out.defect_type):
        out.problems.append("a normal verdict carries boxes or a defect type; they were dropped")
        boxes, out.defect_type = [], None
    if frame is not None:
        converted = []
        for box in boxes:
            mapped = frame.to_original(box)
            if mapped.area > 0:
                converted.append(mapped)
            else:
                where = "has zero width or height" if box.area <= 0 else "lies outside the image"
                out.problems.append(f"box {box.as_list()} {where}"[:200])
        boxes = converted
    out.boxes = boxes
