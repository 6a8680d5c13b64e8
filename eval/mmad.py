"""MMAD multiple choice, scored as MMAD's official scorer does (`evaluation/examples/helper/summary.py`).

Asking: each question of an MMAD record in a fresh chat (MMAD's default: no history), the query image
attached, and one normal reference: `random_templates[0]` as in MMAD's 1-shot setting, `similar_templates[0]`
with `template="similar"` (MMAD's `--similar_template`), none with `use_reference=False`. Options are listed
as "A. text" in letter order. The chosen letter is read by `scoring.read_choice` (MMAD's letter rule, then
the option text; its docstring lists where it reads more carefully than MMAD's scripts).

Scoring (`compute`), as upstream:
- "Object Structure" and "Object Details" merge into one type, "Object Analysis";
- a figure per dataset (the first component of the image's key: `DS-MVTec`, `MVTec-LOCO`, `VisA`,
  `GoodsAD`...) and question type: the share of correct answers; for "Anomaly Detection" the balanced
  accuracy, (accuracy on normal images + accuracy on anomalous images) / 2, an image being normal when its
  key says `good`;
- a dataset's average is the mean over its types; the overall accuracy is the mean of the dataset averages,
  and a type's overall figure the mean over datasets.
Figures are fractions in [0, 1] (upstream prints percentages).

Upstream quirks kept out, so that no reply is silently lost (figures on well-behaved replies are equal): the
upstream scorer drops every answer whose letter is not A-E (an unreadable reply is not counted at all, not
even as wrong) and, as it removes from the list it is iterating, also skips the answer after each dropped
one; here an unreadable (empty) reply counts as wrong and `unparsed` says how many there were. Upstream also
counts a type or a detection class that a dataset lacks as 0 in that dataset's mean; here it is left out.
`good` must be a whole folder name of the key (upstream: any substring of the path).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_assistant import scoring
from anomaly_assistant.eval import distributed
from anomaly_assistant.eval import report as R

INSTRUCTION = ("You are an industrial inspector who checks products by images. A known-good reference of the "
               "same product is given; judge the query image and answer the question about it.")
ANSWER_RULE = "Answer with the option's letter from the given choices directly."
DETECTION = "Anomaly Detection"
MERGED_TYPES = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
TEMPLATES = ("random", "similar")  # which of MMAD's template lists gives the 1-shot reference


def question_text(q: Mapping[str, Any]) -> str:
    """Question, the options one per line as "A. text", and the answer rule."""
    opts = q.get("Options") or {}
    lines = [INSTRUCTION, str(q.get("Question", "")).strip()]
    lines += [f"{k}. {str(v).strip()}" for k, v in sorted(opts.items())]
    lines.append(ANSWER_RULE)
    return "\n".join(lines)


def question_type(raw: str) -> str:
    """MMAD's reported type: "Object Structure" and "Object Details" count as "Object Analysis"."""
    return MERGED_TYPES.get(raw, raw)


def dataset_of(key: str) -> str:
    """The dataset an image belongs to: the first component of its MMAD key (`DS-MVTec/bottle/...`)."""
    return re.split(r"[\\/]", key)[0]


def is_normal_image(key: str) -> bool:
    """MMAD's rule for the detection figure: an image is normal when its key says `good`."""
    return "good" in re.split(r"[\\/]", key)[:-1]


def load(data: str | Path, image_root: str | None = None) -> list[Any]:
    """The MMAD records that carry questions."""
    from anomaly_assistant.data_builders.sources import read_mmad

    return [r for r in read_mmad(data, image_root) if r.meta.get("questions")]


def references(rec: Any, template: str = "random") -> list[str]:
    """A record's 1-shot normal reference: the first of MMAD's `random_templates` or `similar_templates`."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    return rec.meta.get(f"{template}_templates", [])[:1]


def answer_row(rec: Any, q: Mapping[str, Any], reply: str) -> dict[str, Any]:
    """One scored answer: the reply read against the question's options and compared with its answer."""
    choice = scoring.read_choice(reply, q.get("Options") or {})
    return {"image": rec.meta["key"], "image_path": rec.image_path, "category": rec.category,
            "type": str(q.get("type", "")), "question": q.get("Question", ""), "answer": q.get("Answer"),
            "reply": reply, "pred": choice.letter, "read_by": choice.read_by,
            "correct": choice.letter is not None and choice.letter == q.get("Answer")}


def predict(assistant: Any, records: Sequence[Any], use_reference: bool = True, template: str = "random",
            max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """One answer per question, spread over the launched processes (records are the unit of work)."""

    def run(batch: list[Any]) -> list[list[dict[str, Any]]]:
        out = []
        for rec in batch:
            refs = references(rec, template) if use_reference else []
            rows = []
            for q in rec.meta["questions"]:
                reply = assistant.chat(references=refs or None).ask(question_text(q), image=rec.image_path,
                                                                    max_new_tokens=max_new_tokens)
                rows.append(answer_row(rec, q, reply))
            out.append(rows)
        return out

    per_record = distributed.distributed_map(run, list(records), batch_size=1, progress="mmad")
    return [row for rows in per_record for row in rows]


def compute(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """MMAD's table (module docstring) from answer rows with `image` (the MMAD key), `type` and `correct`."""
    per_dataset: dict[str, dict[str, float]] = {}
    for ds in sorted({dataset_of(r["image"]) for r in rows}):
        in_ds = [r for r in rows if dataset_of(r["image"]) == ds]
        figures: dict[str, float] = {}
        for qtype in sorted({question_type(r["type"]) for r in in_ds}):
            asked = [r for r in in_ds if question_type(r["type"]) == qtype]
            correct = [bool(r["correct"]) for r in asked]
            if qtype == DETECTION:
                anomalous = [not is_normal_image(r["image"]) for r in asked]
                figures[qtype] = scoring.balanced_accuracy(anomalous, correct)
            else:
                figures[qtype] = float(np.mean(correct))
        per_dataset[ds] = {**figures, "average": float(np.mean(list(figures.values())))}
    per_type = {}
    for qtype in sorted({question_type(r["type"]) for r in rows}):
        asked = [r for r in rows if question_type(r["type"]) == qtype]
        per_type[qtype] = {
            "accuracy": float(np.mean([v[qtype] for v in per_dataset.values() if qtype in v])),
            "n": len(asked),
            "unparsed": sum(r["pred"] is None for r in asked),
        }
    return {
        "accuracy": float(np.mean([v["average"] for v in per_dataset.values()])) if per_dataset else None,
        "micro_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else None,
        "n_questions": len(rows),
        "n_images": len({r["image"] for r in rows}),
        "per_dataset": per_dataset,
        "per_type": per_type,
        "unparsed": sum(r["pred"] is None for r in rows),
        "read_by": dict(Counter(r["read_by"] for r in rows)),
    }


def evaluate(assistant: Any, data: str, image_root: str | None = None, use_reference: bool = True,
             template: str = "random", max_new_tokens: int = 16,
             limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ask every question (a spread of `limit` images when given) and score the answers: (result, rows)."""
    t0 = time.perf_counter()
    recs = load(data, image_root)
    if limit and limit < len(recs):
        recs = [recs[int(i * len(recs) / limit)] for i in range(limit)]
    rows = predict(assistant, recs, use_reference=use_reference, template=template,
                   max_new_tokens=max_new_tokens)
    result = compute(rows)
    result.update({"seconds": time.perf_counter() - t0, "references": 1 if use_reference else 0,
                   "template": template if use_reference else None})
    return result, rows


def write_report(result: dict[str, Any], rows: Sequence[dict[str, Any]], out_json: str | Path,
                 title: str) -> tuple[Path, Path]:
    """Markdown and HTML report: MMAD's table, per-type counts, a bar chart and example answers."""
    rep = R.Report(title, Path(out_json))
    rep.heading("Accuracy")
    keys = ("accuracy", "micro_accuracy", "n_questions", "n_images", "unparsed", "seconds")
    rep.table([{k: result.get(k) for k in keys}])
    reference = f"{result.get('template')}_templates[0]" if result.get("references") else "none"
    read_by = ", ".join(f"{n} by {rule}" for rule, n in result["read_by"].items())
    rep.text("accuracy = MMAD's average: per dataset the mean over question types (Anomaly Detection as "
             "balanced accuracy over normal and anomalous images), then the mean over datasets; micro = "
             f"pooled over all questions. Normal reference: {reference}. Replies read: {read_by}.")
    types = list(result["per_type"])
    rep.heading("Per dataset and question type")
    rep.table([{"dataset": ds, **v} for ds, v in result["per_dataset"].items()]
              + [{"dataset": "average", **{t: v["accuracy"] for t, v in result["per_type"].items()},
                  "average": result["accuracy"]}], columns=["dataset", *types, "average"])
    rep.heading("Per question type")
    rep.table([{"question type": t, **v} for t, v in result["per_type"].items()])
    rep.heading("Figures")
    rep.figure(R.plot_bars(result["per_dataset"], types, rep.figure_path("per_type.png"), title="MMAD"),
               "Accuracy per dataset and question type")
    rep.heading("Example answers")
    rep.table([{"image": r["image"], "type": r["type"], "question": r["question"][:80],
                "answer": r["answer"], "pred": r["pred"], "reply": r["reply"][:60]} for r in list(rows)[:10]])
    return rep.save()
