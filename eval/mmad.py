"""MMAD-style multiple choice: one normal reference + the query image, one question at a time.

Each question of an MMAD record (`meta["questions"]`: Question / Options / Answer letter / type) is asked
in a fresh chat whose references are the record's first similar template (the normal reference; none
with `use_reference=False`), the query image attached to the question. The reply's chosen letter is the
option letter it names (see `parse_choice`), else the one option whose text the reply contains. Accuracy per
sub-task (MMAD's `type`), their mean ("accuracy", MMAD's average) and the pooled accuracy.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from anomaly_assistant.eval import distributed
from anomaly_assistant.eval import report as R

INSTRUCTION = ("You are an industrial inspector who checks products by images. A known-good reference of the same "
               "product is given; judge the query image and answer the question about it.")
ANSWER_RULE = "Answer with the option's letter from the given choices directly."


def question_text(q: Mapping[str, Any]) -> str:
    """Question, the options one per line as "A. text", and the answer rule."""
    opts = q.get("Options") or {}
    lines = [INSTRUCTION, str(q.get("Question", "")).strip()]
    lines += [f"{k}. {str(v).strip()}" for k, v in sorted(opts.items())]
    lines.append(ANSWER_RULE)
    return "\n".join(lines)


def parse_choice(reply: str, options: Mapping[str, Any]) -> str | None:
    """The chosen option letter, or None when the reply names none (or several by text only).

    In order: the reply is just a letter ("B", "(B)", "B."); "Answer: B"; a leading "B." / "B)"; the one
    option whose text the reply contains; a standalone letter that is not the article "A" starting a phrase.
    """
    letters = sorted(options)
    if not letters:
        return None
    alt = "|".join(map(re.escape, letters))
    text = reply.strip()
    for pattern in (rf"^\(?({alt})\)?[.):]?$", rf"(?i:answer)\s*(?:is)?\s*[:：]?\s*\(?({alt})\b",
                    rf"^\(?({alt})[.):]"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    low = text.lower()
    hits = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower().rstrip(".") in low]
    if len(hits) == 1:
        return hits[0]
    for m in re.finditer(rf"(?<![A-Za-z])({alt})(?![A-Za-z])", text):
        if not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():])):
            return m.group(1)
    return None


def load(data: str | Path, image_root: str | None = None) -> list[Any]:
    from anomaly_assistant.data_builders.sources import read_mmad

    return [r for r in read_mmad(data, image_root) if r.meta.get("questions")]


def predict(assistant: Any, records: Sequence[Any], use_reference: bool = True,
            max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """One answer per question, spread over the launched processes (records are the unit of work)."""

    def run(batch: list[Any]) -> list[list[dict[str, Any]]]:
        out = []
        for rec in batch:
            refs = [rec.reference_path] if use_reference and rec.reference_path else None
            rows = []
            for q in rec.meta["questions"]:
                reply = assistant.chat(references=refs).ask(question_text(q), image=rec.image_path,
                                                            max_new_tokens=max_new_tokens)
                opts = q.get("Options") or {}
                pred = parse_choice(reply, opts)
                rows.append({"image_path": rec.image_path, "category": rec.category, "type": str(q.get("type", "")),
                             "question": q.get("Question", ""), "answer": q.get("Answer"), "reply": reply,
                             "pred": pred, "correct": pred is not None and pred == q.get("Answer")})
            out.append(rows)
        return out

    per_record = distributed.distributed_map(run, list(records), batch_size=1, progress="mmad")
    return [row for rows in per_record for row in rows]


def compute(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    per_type = {}
    for t in sorted({r["type"] for r in rows}):
        sub = [r for r in rows if r["type"] == t]
        per_type[t] = {"accuracy": float(np.mean([r["correct"] for r in sub])), "n": len(sub),
                       "unparsed": sum(r["pred"] is None for r in sub)}
    return {
        "accuracy": float(np.mean([v["accuracy"] for v in per_type.values()])) if per_type else None,
        "micro_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else None,
        "n_questions": len(rows),
        "n_images": len({r["image_path"] for r in rows}),
        "per_type": per_type,
        "unparsed": sum(r["pred"] is None for r in rows),
    }


def evaluate(assistant: Any, data: str, image_root: str | None = None, use_reference: bool = True,
             max_new_tokens: int = 16, limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    t0 = time.perf_counter()
    recs = load(data, image_root)
    if limit and limit < len(recs):
        recs = [recs[int(i * len(recs) / limit)] for i in range(limit)]
    rows = predict(assistant, recs, use_reference=use_reference, max_new_tokens=max_new_tokens)
    result = compute(rows)
    result.update({"seconds": time.perf_counter() - t0, "references": 1 if use_reference else 0})
    return result, rows


def write_report(result: dict[str, Any], rows: Sequence[dict[str, Any]], out_json: str | Path,
                 title: str) -> tuple[Path, Path]:
    rep = R.Report(title, Path(out_json))
    rep.heading("Accuracy")
    rep.table([{k: result.get(k) for k in ("accuracy", "micro_accuracy", "n_questions", "n_images", "unparsed",
                                            "seconds")}])
    rep.text("accuracy = mean over sub-tasks (MMAD's average); micro = pooled over all questions. "
             f"{result.get('references')} normal reference image(s) per query.")
    rep.heading("Per sub-task")
    rep.table([{"sub-task": t, **v} for t, v in result["per_type"].items()])
    rep.heading("Figures")
    rep.figure(R.plot_bars(result["per_type"], ["accuracy"], rep.figure_path("per_type.png"), title="MMAD sub-tasks"),
               "Accuracy per sub-task")
    rep.heading("Example answers")
    rep.table([{"image": Path(r["image_path"]).name, "type": r["type"], "question": r["question"][:80],
                "answer": r["answer"], "pred": r["pred"], "reply": r["reply"][:60]} for r in list(rows)[:10]])
    return rep.save()
