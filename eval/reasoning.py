"""Reasoning in the VisA-D&R protocol: replay each reference dialogue and score every answer.

For each anomalous image, a fresh chat asks the dialogue's first question with the image and every
follow-up with the whole history (the model's own earlier answers), greedy. Each answer is scored
against the reference answer by ROUGE-L, Sentence-BERT cosine and, when a judge is configured, the
LLaVA 1–10 judge. Questions are split as in the paper: low-level (what / where / which type / describe)
vs complex (cause / effect / prevention); a detection yes/no turn stays in the history but is not scored
(the detection protocol scores it). Generation is distributed; scoring runs once on the merged answers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_assistant.eval import distributed
from anomaly_assistant.eval import report as R
from anomaly_assistant.eval.judge import Judge
from anomaly_assistant.eval.text_metrics import SentenceEncoder, default_encoder, rouge_l

KINDS = ("low_level", "complex")
_COMPLEX = re.compile(
    r"\b(why|causes?|caused|causing|reasons?|effects?|affects?|impacts?|consequences?|influence|prevent\w*|"
    r"avoid\w*|improve\w*|solutions?|fix|mitigat\w*|root|origin|function\w*|safety|risk\w*|remed\w*)\b",
    re.IGNORECASE,
)
_DETECTION = re.compile(
    r"\b(any|are there|is there)\b.*\b(defects?|anomal\w*)\b.*\b(yes|no)\b", re.IGNORECASE | re.DOTALL
)


def question_kind(question: str) -> str:
    """"detection" (yes/no), "complex" (cause / effect / prevention) or "low_level" (everything else)."""
    if _DETECTION.search(question):
        return "detection"
    return "complex" if _COMPLEX.search(question) else "low_level"


def qa_pairs(record: Any) -> list[tuple[str, str, str]]:
    """(question, reference answer, kind) from `record.meta["conversations"]`.

    Turns may carry their own kind; otherwise `question_kind` decides from the question.
    """
    turns = record.meta.get("conversations") or []
    pairs = []
    for q, a in pairwise(turns):
        if q.get("role") == "user" and a.get("role") == "assistant":
            kind = q.get("kind") or q.get("type")
            kind = kind if kind in (*KINDS, "detection") else question_kind(q["content"])
            pairs.append((q["content"], a["content"], kind))
    return pairs


def load(data: str | Path, image_root: str | None = None, category: str | None = None) -> list[Any]:
    """Anomalous VisA-D&R records that have at least one question/answer pair."""
    from anomaly_assistant.data_builders.sources import read_visa_dr

    recs = read_visa_dr(data, image_root)
    return [
        r for r in recs if r.gt_label == 1 and qa_pairs(r) and (category is None or r.category == category)
    ]


def replay(assistant: Any, records: Sequence[Any], refs: dict[str, list[str]] | None = None,
           max_new_tokens: int = 256) -> list[list[dict[str, Any]]]:
    """The model's answers, one list of turns per record, spread over the launched processes."""
    refs = refs or {}

    def run(batch: list[Any]) -> list[list[dict[str, Any]]]:
        out = []
        for rec in batch:
            session = assistant.chat(references=refs.get(rec.category) or None)
            turns = []
            for i, (question, reference, kind) in enumerate(qa_pairs(rec)):
                answer = session.ask(question, image=rec.image_path if i == 0 else None,
                                     max_new_tokens=max_new_tokens)
                turns.append({"image_path": rec.image_path, "category": rec.category,
                              "defect_type": rec.defect_type, "turn": i, "kind": kind, "question": question,
                              "reference": reference, "answer": answer})
            out.append(turns)
        return out

    return distributed.distributed_map(run, list(records), batch_size=1, progress="dialogues")


def score_turns(
    turns: list[dict[str, Any]], encoder: SentenceEncoder | None = None, judge: Judge | None = None
) -> None:
    """Adds rouge_l, sbert and (with a judge) judge_score / judge_reference_score to every scored turn.

    The turns are changed in place; detection turns are not scored.
    """
    scored = [t for t in turns if t["kind"] in KINDS]
    if not scored:
        return
    sims = (encoder or default_encoder()).cosine(
        [t["answer"] for t in scored], [t["reference"] for t in scored]
    )
    for t, sim in zip(scored, sims):
        t["rouge_l"] = rouge_l(t["answer"], t["reference"])
        t["sbert"] = sim
        if judge is not None:
            context = (
                f"An image of a {t['category'] or 'product'}; ground-truth defect type: {t['defect_type']}."
            )
            js = judge.score(t["question"], t["reference"], t["answer"], context=context)
            t["judge_score"], t["judge_reference_score"] = js.answer_score, js.reference_score


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(turns: Sequence[dict[str, Any]], judged: bool) -> dict[str, Any]:
    """Per kind: mean ROUGE-L, SBERT, judge score (null without a judge), turn count; also per class."""

    def block(ts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "rouge_l": _mean([t.get("rouge_l") for t in ts]),
            "sbert": _mean([t.get("sbert") for t in ts]),
            "judge_score": _mean([t.get("judge_score") for t in ts]) if judged else None,
            "judge_relative": _mean([t["judge_score"] / t["judge_reference_score"] for t in ts
                                     if t.get("judge_score") is not None and t.get("judge_reference_score")])
            if judged else None,
            "judge_unparsed": sum(1 for t in ts if judged and t.get("judge_score") is None),
            "n_turns": len(ts),
        }

    out = {kind: block([t for t in turns if t["kind"] == kind]) for kind in KINDS}
    per_class = {}
    for cat in sorted({t["category"] for t in turns}):
        per_class[cat or "-"] = {kind: block([t for t in turns if t["kind"] == kind and t["category"] == cat])
                                 for kind in KINDS}
    out["per_class"] = per_class
    return out


def evaluate(assistant: Any, data: str, judge: Judge | None = None, image_root: str | None = None,
             category: str | None = None, max_new_tokens: int = 256, limit: int | None = None,
             encoder: SentenceEncoder | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The VisA-D&R reasoning protocol end to end: (result dict, every replayed turn with its scores).

    Scoring runs on the main process only, so a judge is asked once per turn however many processes replay.
    """
    t0 = time.perf_counter()
    recs = load(data, image_root, category)
    if limit and limit < len(recs):
        recs = [recs[int(i * len(recs) / limit)] for i in range(limit)]
    dialogues = replay(assistant, recs, max_new_tokens=max_new_tokens)
    turns = [t for d in dialogues for t in d]
    if distributed.is_main_process():
        score_turns(turns, encoder=encoder, judge=judge)
    result = summarize(turns, judged=judge is not None)
    result.update({"n_dialogues": len(dialogues), "n_turns": len(turns),
                   "n_scored_turns": sum(1 for t in turns if t["kind"] in KINDS),
                   "seconds": time.perf_counter() - t0})
    return result, turns


def write_report(result: dict[str, Any], turns: Sequence[dict[str, Any]], out_json: str | Path,
                 title: str) -> tuple[Path, Path]:
    """Markdown + HTML report of a reasoning run, so the scores can be read next to the dialogues."""
    rep = R.Report(title, Path(out_json))
    rep.heading("Scores (VisA-D&R protocol)")
    rep.table([{"questions": k, **{m: result[k][m] for m in ("rouge_l", "sbert", "judge_score",
                                                                  "judge_relative", "n_turns")}}
               for k in KINDS])
    rep.text(f"{result['n_dialogues']} dialogues, {result['n_turns']} turns replayed with history (greedy). "
             "ROUGE-L: rouge-score F-measure; SBERT: all-MiniLM-L6-v2 cosine; judge: LLaVA rule, answer's "
             "1–10 score (relative = answer / reference score). The paper reports ROUGE-L for low-level "
             "questions only.")
    rows = []
    for cat, kinds in result["per_class"].items():
        row: dict[str, Any] = {"class": cat}
        for k in KINDS:
            for m in ("rouge_l", "sbert", "judge_score"):
                row[f"{k}.{m}"] = kinds[k][m]
        rows.append(row)
    rep.heading("Per class")
    rep.table(rows)
    rep.heading("Figures")
    bars = {c: {f"{k} sbert": v[k]["sbert"] for k in KINDS} | {"low_level rouge_l": v["low_level"]["rouge_l"]}
            for c, v in result["per_class"].items()}
    rep.figure(R.plot_bars(bars, ["low_level rouge_l", "low_level sbert", "complex sbert"],
                           rep.figure_path("per_class.png"), title="reasoning per class"),
               "Low-level ROUGE-L and SBERT, complex SBERT, per class")
    rep.heading("Example turns")
    rep.table([{"image": Path(t["image_path"]).name, "kind": t["kind"], "question": t["question"][:80],
                "reference": t["reference"][:120], "answer": t["answer"][:120], "sbert": t.get("sbert")}
               for t in list(turns)[:8]])
    return rep.save()
