"""Conversation synthesis in the Anomaly-Instruct style, with the answer grammar as the inspection target.

For one record (image + ground truth) and the chosen backbone's input `Frame`, `build_samples` writes:
- `inspect`: the inspection prompt -> `<think>…</think><answer>{json}</answer>` (boxes in the input frame);
- `detect`: the VisA-D&R yes/no question -> "Yes" / "No";
- `describe`: Anomaly-Instruct low-level questions (what it shows, is there an anomaly, where, what type) as
  free text;
- `dialogue`: the inspection turn followed by follow-ups: where / what type (low-level) and likely cause /
  effect on function / prevention (complex, from `knowledge.py`), in varied phrasings.
Without a teacher the templated text is complete; with one (`teacher.Teacher`), rationales and free-text
answers are rewritten by an LLM, with the facts (type, place, verdict) given to it and the grammar left
untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from anomaly_assistant.data_builders import knowledge
from anomaly_assistant.data_builders.records import Record
from anomaly_assistant.finding import Frame, boxes_in_frame, location_words, size_words
from anomaly_assistant.grammar import render_answer
from anomaly_assistant.prompts import DETECTION_PROMPT, INSPECTION_PROMPT  # what the product asks: one home
from anomaly_assistant.scoring import canonical_defect

INSPECTION_PROMPTS = (
    INSPECTION_PROMPT,
    "Is this {what} defective? Think step by step in <think></think>, then give <answer></answer> JSON with "
    "verdict, defect_type, boxes as [x1, y1, x2, y2] pixels, and rationale.",
    "Check the {what} in this picture for anomalies. Use <think></think> for your reasoning and "
    "<answer></answer> for a JSON object with verdict, defect_type, boxes and rationale.",
    "Quality inspection: look for scratches, cracks, holes, stains, missing or foreign parts. Reply with "
    '<think>reasoning</think><answer>{{"verdict", "defect_type", "boxes", "rationale"}} as JSON</answer>.',
)
DETECTION_PROMPTS = (
    DETECTION_PROMPT,
    "Is there any anomaly in this image? Answer Yes or No.",
    "Does this {what} have a defect? Reply with 'Yes' or 'No'.",
)
SAMPLE_KINDS = ("inspect", "detect", "describe", "dialogue")
CANONICAL_SHARE = 0.5  # share of inspection / detection turns asked with the product's exact prompt


class RewriteFn(Protocol):
    """The shape of a teacher's rewrite hook: `build_samples` takes any such callable, not only a Teacher."""

    def __call__(self, kind: str, text: str, facts: dict[str, Any]) -> str: ...


@dataclass
class Sample:
    """One training conversation.

    `messages` are [{"role", "content": str}]; the image belongs to the first user turn. `answer` is the
    grammar text of the inspection turn (also the GRPO solution); `boxes_input` the ground-truth boxes in the
    backbone's input frame.
    """

    kind: str
    messages: list[dict[str, str]]
    record: Record
    frame: Frame
    answer: str
    boxes_input: list[list[int]] = field(default_factory=list)
    defect_type: str | None = None  # canonical written form


# --------------------------------------------------------------------------------------------- facts


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _prompt(rng: np.random.Generator, options: Sequence[str], what: str) -> str:
    """The product's own prompt (options[0]) half of the time, a paraphrase otherwise."""
    if rng.random() < CANONICAL_SHARE:
        return options[0]
    return _pick(rng, options[1:]).format(what=what)


def record_facts(rec: Record, frame: Frame) -> dict[str, Any]:
    """What the conversations say about one record: verdict, type, family, place and size words, boxes."""
    size = rec.image_size or frame.original_size
    fam = knowledge.family_of(rec.defect_type)
    primary = rec.gt_boxes[0] if rec.gt_boxes else None
    defect = canonical_defect(rec.defect_type)
    return {
        "what": knowledge.describe_category(rec.category),
        "category": rec.category.replace("_", " ") or "part",
        "anomalous": bool(rec.gt_label),
        "defect": defect or ("anomaly" if rec.gt_label else None),
        "family": fam,
        "n_boxes": len(rec.gt_boxes),
        "where": location_words(primary, size) if primary else None,
        "size": size_words(primary, size) if primary else None,
    }


# --------------------------------------------------------------------------------------------- text pieces


def _think(f: dict[str, Any], rng: np.random.Generator) -> str:
    if not f["anomalous"]:
        return _pick(
            rng,
            (
                f"The image shows {f['what']}. Its surface and outline are regular everywhere; I see no "
                f"scratch, crack, hole, stain or missing part, so it is normal.",
                f"I check {f['what']} region by region. Texture, colour and shape are consistent across the "
                f"image, with nothing that departs from a defect-free part. Verdict: normal.",
                f"This is {f['what']}. Nothing breaks the regular pattern and no part is missing or foreign, "
                f"so the part is defect-free.",
            ),
        )
    looks = _pick(rng, f["family"].looks)
    place = f"at the {f['where']}" if f["where"] else "in the image"
    many = f" There are {f['n_boxes']} such regions." if f["n_boxes"] > 1 else ""
    return _pick(
        rng,
        (
            f"The image shows {f['what']}. {place.capitalize()} there is {looks}.{many} "
            f"This is a {f['defect']}, so the part is anomalous.",
            f"I look over {f['what']}. Most of it is regular, but {place} I see {looks}.{many} "
            f"That is a {f['defect']}: anomalous.",
            f"Scanning {f['what']}: {place} the regular appearance is broken by {looks}.{many} "
            f"Verdict: anomalous, {f['defect']}.",
        ),
    )


def _rationale(f: dict[str, Any], rng: np.random.Generator) -> str:
    if not f["anomalous"]:
        return _pick(
            rng,
            (
                "No defect is visible; the part looks as expected.",
                "Uniform appearance with no visible defect.",
                "Defect-free: texture and shape are regular throughout.",
            ),
        )
    where = f" at the {f['where']}" if f["where"] else ""
    size = f"{f['size']} " if f["size"] else ""
    return _pick(
        rng,
        (
            f"A {size}{f['defect']}{where} of the {f['category']}.",
            f"{f['defect'].capitalize()}{where}: {_pick(rng, f['family'].looks)}.",
            f"The {f['category']} shows a {size}{f['defect']}{where}.",
        ),
    )


def _answer_yes_no(f: dict[str, Any]) -> str:
    return "Yes" if f["anomalous"] else "No"


def _describe(f: dict[str, Any], rng: np.random.Generator) -> str:
    if not f["anomalous"]:
        return f"No. The image shows {f['what']}, and it looks normal: no defect is visible."
    where = f" at the {f['where']}" if f["where"] else ""
    return (
        f"Yes. The image shows {f['what']} with a {f['size'] or ''} {f['defect']}{where}: "
        f"{_pick(rng, f['family'].looks)}."
    ).replace("  ", " ")


def followup_turns(
    f: dict[str, Any], boxes_input: list[list[int]], rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    """(kind, question, answer) follow-up turns for a dialogue."""
    fam = f["family"]
    if not f["anomalous"]:
        return [
            (
                "low_level",
                _pick(rng, ("What does the image show?", "Describe the image.")),
                f"It shows {f['what']}. Everything looks regular, with no sign of damage or contamination.",
            ),
            (
                "low_level",
                _pick(rng, ("Are you sure there is no defect?", "Could there be a defect you missed?")),
                "I found nothing that departs from a defect-free part: the texture, colour and outline are "
                "consistent. Very small defects are easier to rule out with a known-good reference image.",
            ),
            (
                "complex",
                _pick(
                    rng,
                    (
                        "What defects would you look for on this kind of part?",
                        "What typically goes wrong with parts like this?",
                    ),
                ),
                f"On {f['what']} the usual suspects are scratches, cracks, holes, stains and missing or "
                f"foreign material; none of them is present here.",
            ),
        ]
    box_text = ", ".join(str(b) for b in boxes_input[:4])
    where = f"the {f['where']}" if f["where"] else "the marked region"
    causes, effects, prevention = fam.causes, fam.effects, fam.prevention
    turns = [
        (
            "low_level",
            _pick(
                rng,
                (
                    "Where exactly is the defect?",
                    "Where is the anomaly located?",
                    "Can you point to the defect?",
                ),
            ),
            f"It is at {where} of the image" + (f", inside {box_text} in input pixels." if box_text else "."),
        ),
        (
            "low_level",
            _pick(
                rng,
                (
                    "What type of defect is it?",
                    "What kind of anomaly is this?",
                    "How would you classify the defect?",
                ),
            ),
            f"It is a {f['defect']}: {_pick(rng, fam.looks)}.",
        ),
        (
            "complex",
            _pick(
                rng,
                (
                    "What could have caused it?",
                    "What is the likely cause of this defect?",
                    "Why might this have happened?",
                ),
            ),
            f"Likely causes of a {f['defect']} are {causes[0]}"
            + (f", or {causes[1]}." if len(causes) > 1 else "."),
        ),
        (
            "complex",
            _pick(
                rng,
                (
                    "How does it affect the part?",
                    "Does this defect matter for the part's function?",
                    "What is the impact of this defect?",
                ),
            ),
            f"Yes: {_pick(rng, effects)}.",
        ),
        (
            "complex",
            _pick(
                rng,
                (
                    "How can this be prevented?",
                    "What would you change to avoid it?",
                    "How do we stop this from happening again?",
                ),
            ),
            "; ".join(prevention[:2]).capitalize() + ".",
        ),
    ]
    return turns if boxes_input else turns[1:]  # without a box there is no "where" to answer


# --------------------------------------------------------------------------------------------- samples


def inspection_answer(
    rec: Record, frame: Frame, rng: np.random.Generator | int | None = None, rewrite: RewriteFn | None = None
) -> tuple[str, list[list[int]]]:
    """The grammar target of the inspection turn and the boxes it contains (input frame)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    f = record_facts(rec, frame)
    boxes_input = boxes_in_frame(rec.gt_boxes, frame) if rec.gt_label else []
    think, rationale = _think(f, rng), _rationale(f, rng)
    if rewrite is not None:
        facts = {k: v for k, v in f.items() if k != "family"} | {"family": f["family"].name}
        think, rationale = rewrite("think", think, facts), rewrite("rationale", rationale, facts)
    verdict = "anomalous" if rec.gt_label else "normal"
    return render_answer(
        think, verdict, f["defect"] if rec.gt_label else None, boxes_input, rationale
    ), boxes_input


def build_samples(
    rec: Record,
    frame: Frame,
    rng: np.random.Generator | int | None = None,
    kinds: Sequence[str] = SAMPLE_KINDS,
    max_followups: int = 3,
    rewrite: RewriteFn | None = None,
) -> list[Sample]:
    """All requested conversation kinds for one record (see the module docstring)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    f = record_facts(rec, frame)
    answer, boxes_input = inspection_answer(rec, frame, rng, rewrite)
    defect = f["defect"] if rec.gt_label else None
    facts = {k: v for k, v in f.items() if k != "family"} | {"family": f["family"].name}

    def text(kind: str, value: str) -> str:
        return rewrite(kind, value, facts) if rewrite is not None else value

    out = []
    for kind in kinds:
        if kind == "inspect":
            msgs = [
                {"role": "user", "content": _prompt(rng, INSPECTION_PROMPTS, f["category"])},
                {"role": "assistant", "content": answer},
            ]
        elif kind == "detect":
            msgs = [
                {"role": "user", "content": _prompt(rng, DETECTION_PROMPTS, f["category"])},
                {"role": "assistant", "content": _answer_yes_no(f)},
            ]
        elif kind == "describe":
            msgs = [
                {
                    "role": "user",
                    "content": _pick(
                        rng,
                        (
                            "Is there any anomaly in the image? If so, describe what and where it is.",
                            "Describe this image and tell me whether anything is wrong with it.",
                            f"Look at this {f['category']}. Is it defective? Explain.",
                        ),
                    ),
                },
                {"role": "assistant", "content": text("describe", _describe(f, rng))},
            ]
        elif kind == "dialogue":
            msgs = [
                {"role": "user", "content": _prompt(rng, INSPECTION_PROMPTS, f["category"])},
                {"role": "assistant", "content": answer},
            ]
            turns = followup_turns(f, boxes_input, rng)
            n = int(rng.integers(1, min(max_followups, len(turns)) + 1))
            keep = sorted(rng.choice(len(turns), size=n, replace=False).tolist())
            for i in keep:
                kind_i, q, a = turns[i]
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": text(kind_i, a)}]
        else:
            raise ValueError(f"unknown sample kind {kind!r}; choose from {SAMPLE_KINDS}")
        out.append(Sample(kind, msgs, rec, frame, answer, boxes_input, defect))
    return out


def to_llava(sample: Sample, image: str | None = None) -> dict[str, Any]:
    """A sample in Anomaly-Instruct's LLaVA JSON form ({id, image, conversations, metadata})."""
    conv = []
    for i, m in enumerate(sample.messages):
        value = ("<image>\n" + m["content"]) if i == 0 else m["content"]
        conv.append({"from": "human" if m["role"] == "user" else "gpt", "value": value})
    rec = sample.record
    return {
        "id": f"{rec.group}#{sample.kind}",
        "image": image or rec.image_path,
        "conversations": conv,
        "metadata": {
            "anomaly": bool(rec.gt_label),
            "mask": rec.gt_mask,
            "category": "industrial",
            "class": rec.category,
            "defect_type": sample.defect_type,
        },
    }
