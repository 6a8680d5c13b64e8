"""Detection in the VisA-D&R protocol: ask "Are there any defects…? Yes/No" and score the replies.

A reply containing "yes" (case-insensitive, anywhere, as the protocol says: `scoring.is_yes`) counts as
anomalous. Accuracy, precision, recall and F1 are computed per class and then macro-averaged (the top-level
numbers); the pooled (micro) numbers are kept alongside. Few-shot mode gives each class its first k normal
images as references: for an MVTec-layout folder the first k of `train/good` in sorted order; for a VisA-D&R
JSON (which has no train split) the first k normal images of that class in sorted order, which are then left
out of the evaluated set. An assistant without an LLM answers with the expert's verdict instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomaly_assistant import scoring
from anomaly_assistant.eval import distributed, metrics
from anomaly_assistant.eval import report as R
from anomaly_assistant.localize import threshold_from_labels
from anomaly_assistant.prompts import DETECTION_PROMPT  # the protocol's question; one home for prompts


def is_json_source(data: str | Path) -> bool:
    """Whether `data` is a VisA-D&R conversation file rather than an MVTec-layout folder."""
    return Path(data).suffix.lower() in (".json", ".jsonl")


def load(data: str | Path, category: str | None = None, references: int = 0,
         image_root: str | None = None) -> tuple[list[Any], dict[str, list[str]]]:
    """(records to evaluate, references per class) from an MVTec-layout root or a VisA-D&R JSON."""
    from anomaly_assistant.data_builders.sources import read_mvtec, read_visa_dr

    if is_json_source(data):
        recs = read_visa_dr(data, image_root)
        if category:
            recs = [r for r in recs if r.category == category]
        refs: dict[str, list[str]] = {}
        if references > 0:
            for cat in sorted({r.category for r in recs}):
                good = sorted(r.image_path for r in recs if r.category == cat and r.gt_label == 0)
                refs[cat] = good[:references]
            taken = {p for ps in refs.values() for p in ps}
            recs = [r for r in recs if r.image_path not in taken]
        return recs, refs
    recs = read_mvtec(data, category=category, split="test", with_boxes=False)
    refs = {}
    if references > 0:
        train = read_mvtec(data, category=category, split="train", with_boxes=False)
        for cat in sorted({r.category for r in recs}):
            good = sorted(r.image_path for r in train if r.category == cat and r.gt_label == 0)
            if len(good) < references:
                raise ValueError(
                    f"class {cat}: {len(good)} normal training images, {references} references asked"
                )
            refs[cat] = good[:references]
    return recs, refs


def predict(assistant: Any, records: Sequence[Any], refs: dict[str, list[str]], expert_only: bool = False,
            max_new_tokens: int = 16, batch_size: int = 1) -> list[dict[str, Any]]:
    """One reply per image (a fresh chat per image, greedy), spread over the launched processes."""
    use_expert = expert_only or not assistant.has_llm

    def run(batch: list[Any]) -> list[dict[str, Any]]:
        out = []
        for rec in batch:
            ref = refs.get(rec.category) or None
            score = None
            if use_expert:  # the assistant caches the fitted reference bank of each class
                finding = assistant.screen([rec.image_path], references=ref)[0]
                reply, score = ("Yes" if finding.is_anomalous else "No"), finding.score
            else:
                reply = assistant.chat(references=ref).ask(DETECTION_PROMPT, image=rec.image_path,
                                                           max_new_tokens=max_new_tokens)
            out.append({"image_path": rec.image_path, "category": rec.category,
                        "gt_label": int(rec.gt_label), "defect_type": rec.defect_type, "reply": reply,
                        "pred_label": int(scoring.is_yes(reply)), "score": score})
        return out

    return distributed.distributed_map(run, list(records), batch_size=batch_size, progress="detection")


def compute(preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Macro-averaged metrics (top level), per class, and pooled (micro)."""
    cats = [p["category"] or "-" for p in preds]
    y = [p["gt_label"] for p in preds]
    yhat = [p["pred_label"] for p in preds]
    per_class, macro = scoring.per_class_binary(cats, y, yhat)
    micro = scoring.binary_metrics(y, yhat)
    out: dict[str, Any] = {**macro, "n_images": len(preds)}
    out["per_class"] = per_class
    out["micro"] = {k: micro[k] for k in scoring.BINARY_KEYS}
    if preds and all(p.get("score") is not None for p in preds):
        scores = [p["score"] for p in preds]
        out["image_auroc"] = metrics.image_auroc(y, scores)
        # the threshold these labels suggest (pass it as --threshold), pooled and per class
        out["suggested_threshold"] = threshold_from_labels(scores, y)
        for c in per_class:
            mine = [i for i, k in enumerate(cats) if k == c]
            per_class[c]["suggested_threshold"] = threshold_from_labels([scores[i] for i in mine],
                                                                        [y[i] for i in mine])
    return out


def evaluate(assistant: Any, data: str, category: str | None = None, references: int = 0,
             expert_only: bool = False, max_new_tokens: int = 16, image_root: str | None = None,
             limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The yes/no detection protocol end to end: (result dict, per-image predictions).

    `limit` keeps an evenly spaced subset, so a quick run still covers every class.
    """
    t0 = time.perf_counter()
    recs, refs = load(data, category, references, image_root)
    if limit and limit < len(recs):
        step = len(recs) / limit
        recs = [recs[int(i * step)] for i in range(limit)]
    preds = predict(assistant, recs, refs, expert_only=expert_only, max_new_tokens=max_new_tokens)
    result = compute(preds)
    result["seconds"] = time.perf_counter() - t0
    result.update({"references": references, "prompt": DETECTION_PROMPT})
    return result, preds


def write_report(result: dict[str, Any], preds: Sequence[dict[str, Any]], out_json: str | Path,
                 title: str) -> tuple[Path, Path]:
    """Markdown + HTML report of a detection run: per-class tables, ROC if scores exist, example replies."""
    rep = R.Report(title, Path(out_json))
    rep.heading("Macro average over classes")
    rep.table([{k: result.get(k) for k in (*scoring.BINARY_KEYS, "n_images", "seconds")}])
    rep.text(f"Prompt: “{result.get('prompt')}”; a reply containing “yes” counts as anomalous. "
             f"{result.get('references', 0)} reference normal image(s) per class. "
             f"Mode: {result.get('mode', '')}.")
    rep.heading("Per class")
    rep.table([{"class": c, **{k: v.get(k) for k in (*scoring.BINARY_KEYS, "tp", "fp", "tn", "fn", "n")}}
               for c, v in result["per_class"].items()])
    rep.heading("Pooled over all images (micro)")
    rep.table([result["micro"]])
    rep.heading("Figures")
    rep.figure(R.plot_bars(result["per_class"], list(scoring.BINARY_KEYS), rep.figure_path("per_class.png"),
                           title="detection per class"),
               "Accuracy, precision, recall, F1 per class")
    if result.get("image_auroc") is not None:
        pts = metrics.roc_points([p["gt_label"] for p in preds], [p["score"] for p in preds])
        rep.figure(R.plot_roc({"expert score": (*pts, result["image_auroc"])}, rep.figure_path("roc.png")),
                   "ROC of the expert's image score")
    rep.heading("Example replies")
    wrong = [p for p in preds if p["pred_label"] != p["gt_label"]][:5]
    right = [p for p in preds if p["pred_label"] == p["gt_label"]][:5]
    rep.table([{"image": Path(p["image_path"]).name, "class": p["category"],
                "truth": p["defect_type"] or "good", "reply": p["reply"][:120],
                "correct": p["pred_label"] == p["gt_label"]} for p in right + wrong])
    return rep.save()
