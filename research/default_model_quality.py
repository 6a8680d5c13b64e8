"""How good is a trained default model? Held-out SynthInspect, follow-up questions and real parts, measured.

    python research/default_model_quality.py runs/default-model --baseline-llm \
        --real-dev /work/shared/data/real-dev --out runs/default-model/quality-seed7919.json

Every inspection goes through the product: `assistant.chat(references=refs).inspect(image)` (greedy).

1. Held-out SynthInspect (`--seed`, 7919 by default; the training seed is refused): for every category,
   `--per-category` test images (half anomalous) at the training image size (`data.synth_size` of
   MODEL_DIR/pipeline_config.json, else 128), each inspected with 4 further normal images of its category
   (same seed, not in the test set) as references. Two views: the *answer* (the model's own verdict, boxes
   and type; an answer that does not parse, i.e. not source "model" with no parse_error, counts as wrong
   and boxless; `model_rate` also counts answers the parser had to repair) and what the user is *shown*
   (`finding.verdict` / `finding.boxes`, the expert's when the answer did not parse). Detection accuracy /
   precision / recall / F1 (`scoring.binary_metrics`); on anomalous images the median best IoU of any
   answered box with any ground-truth box (0 without a box), the share of ground-truth boxes matched
   one-to-one at IoU >= 0.1 / 0.5 (`scoring.box_scores`), defect-type accuracy (equal `canonical_defect`)
   and mean `type_similarity`.
2. Follow-ups: on `--followups` anomalous held-out images (round-robin over categories), after the inspection
   turn, the training dialogues' cause / effect / prevention questions (`data_builders.conversations`: the
   phrasing and templated reference answer for the image's defect type), each asked right after the
   inspection turn, scored against the reference with ROUGE-L and SBERT cosine (`eval.text_metrics`).
   `--baseline-llm`: plain SmolLM2-135M-Instruct (the converted base, text only, no image) gets the same
   history as text: the inspection prompt, our model's inspection answer, then the question.
3. `--real-dev DIR` (measure only, no tuning): magnetic tiles (the first 4 of train/good as references,
   `--real-limit` balanced test tiles) and DeepPCB (`--real-limit`/2 pairs: each defective board against its
   own template as the only reference, and the template itself, against itself, as the defect-free case).

MODEL_DIR may also be an adapter-only training checkpoint (`runs/default-model/sft/checkpoint-N`: merged onto
its base; the pipeline config is looked up in its parents). Torch runs with `--threads 1` by default: on the
2-core CPU shared with training, 2 threads made each inspection about 30x slower.

Prints one Markdown table per part and writes everything (figures, counts, settings, per-image answers,
seconds per inspection) to `--out`.
"""

from __future__ import annotations

import anomaly_assistant  # noqa: F401 - first: it sets torch's OpenMP spin count before torch loads

# isort: split

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

N_REFS = 4
COMPLEX = ("cause", "effect", "prevention")  # the complex follow-ups of an anomalous dialogue, in order


def load_assistant(model_dir: Path):
    """A model folder, or an adapter-only training checkpoint (`sft/checkpoint-N`) merged onto its base."""
    from anomaly_assistant import AnomalyAssistant

    adapter = model_dir / "adapter_config.json"
    if (model_dir / "config.json").is_file() or not adapter.is_file():
        return AnomalyAssistant.from_pretrained(str(model_dir))
    from peft import PeftModel

    base = AnomalyAssistant.from_pretrained(json.loads(adapter.read_text())["base_model_name_or_path"])
    return AnomalyAssistant(PeftModel.from_pretrained(base.model, str(model_dir)).merge_and_unload(),
                            base.processor)


def inspect(assistant, image, refs, max_new_tokens: int):
    """(session, finding, seconds) of one product inspection with references."""
    t0 = time.perf_counter()
    session = assistant.chat(references=refs)
    finding = session.inspect(image, max_new_tokens=max_new_tokens)
    return session, finding, time.perf_counter() - t0


def parsed(finding) -> bool:
    return finding.source == "model" and finding.parse_error is None


def summarise(items: list[dict], view: str) -> dict:
    """Detection, box and type figures of inspected items ({label, gt_boxes, gt_type, finding})."""
    from anomaly_assistant import scoring as S

    labels, preds, best, hits, n_gt, type_ok, type_sim = [], [], [], {0.1: 0, 0.5: 0}, 0, [], []
    for it in items:
        f, y = it["finding"], it["label"]
        if view == "answer" and not parsed(f):
            pred, boxes, dtype = 1 - y, [], None  # an unparsed answer is wrong and shows nothing
        else:
            pred, boxes, dtype = f.pred_label, [b.as_list() for b in f.boxes], f.defect_type
        labels.append(y)
        preds.append(pred)
        if not y:
            continue
        gt = it["gt_boxes"]
        best.append(float(S.iou_matrix(boxes, gt).max()) if boxes and gt else 0.0)
        n_gt += len(gt)
        for t in hits:
            hits[t] += len(S.box_scores(boxes, gt, t).matches)
        type_ok.append(S.canonical_defect(dtype) == S.canonical_defect(it["gt_type"]))
        type_sim.append(S.type_similarity(dtype, it["gt_type"]))
    out = S.binary_metrics(labels, preds)
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return out | {
        "parse_rate": mean([parsed(it["finding"]) for it in items]),
        "model_rate": mean([it["finding"].source == "model" for it in items]),  # also repaired answers
        "n_anomalous": len(best),
        "median_best_iou": float(np.median(best)) if best else None,
        "box_recall@0.1": hits[0.1] / n_gt if n_gt else None,
        "box_recall@0.5": hits[0.5] / n_gt if n_gt else None,
        "type_accuracy": mean(type_ok),
        "type_similarity": mean(type_sim),
    }


def fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(title: str, rows: dict[str, dict], keys: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |")


METRICS = ["n", "parse_rate", "model_rate", "accuracy", "precision", "recall", "f1", "median_best_iou",
           "box_recall@0.1", "box_recall@0.5", "type_accuracy", "type_similarity"]


def record(it: dict, seconds: float) -> dict:
    """What the JSON keeps of one inspected item."""
    f = it["finding"]
    return {k: v for k, v in it.items() if k not in ("finding", "image", "refs")} | {
        "verdict": f.verdict, "source": f.source, "parse_error": f.parse_error, "defect_type": f.defect_type,
        "boxes": [[round(x, 1) for x in b.as_list()] for b in f.boxes], "raw_text": f.raw_text,
        "seconds": round(seconds, 2)}


def run_items(assistant, items: list[dict], max_new_tokens: int, on_done=None):
    """Inspect every item (sets item["finding"]); -> (JSON records, seconds per inspection)."""
    seconds = []
    for it in items:
        session, it["finding"], s = inspect(assistant, it["image"], it["refs"], max_new_tokens)
        seconds.append(s)
        print(f"[{len(seconds)}/{len(items)}] {it['set']} label {it['label']}: {it['finding'].verdict} "
              f"({it['finding'].source}), {s:.1f} s", file=sys.stderr, flush=True)
        if on_done:
            on_done(it, session)
    return [record(it, s) for it, s in zip(items, seconds)], seconds


def synth_items(seed: int, size: int, per_category: int) -> list[dict]:
    """Held-out test images, round-robin over the categories, each with its category's 4 normal references."""
    from PIL import Image

    from anomaly_assistant.data_builders.synth_inspect import CATEGORIES, render

    refs = {c: [Image.fromarray(render(c, per_category + k, seed, size, anomalous=False).image)
                for k in range(N_REFS)] for c in CATEGORIES}
    items = []
    for i in range(per_category):
        for k, c in enumerate(CATEGORIES):  # alternate, so that every count is (about) half anomalous
            smp = render(c, i, seed, size, anomalous=(i + k) % 2 == 0)
            items.append({"set": "synth", "category": c, "index": i, "label": smp.gt_label,
                          "gt_boxes": smp.gt_boxes, "gt_type": smp.defect_type,
                          "image": Image.fromarray(smp.image), "refs": refs[c]})
    return items


def followup_turns(assistant, it: dict, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(name, question, reference answer) of the training dialogues' complex follow-ups for this image."""
    from anomaly_assistant.backbones import family_of, get
    from anomaly_assistant.data_builders import conversations as conv
    from anomaly_assistant.data_builders.records import Record

    rec = Record("", 1, gt_boxes=it["gt_boxes"], defect_type=it["gt_type"], category=it["category"],
                 image_size=it["image"].size)
    frame = get(family_of(assistant.model.config)).input_frame(assistant.processor, it["image"].size)
    turns = conv.followup_turns(conv.record_facts(rec, frame), conv.boxes_in_frame(rec.gt_boxes, frame), rng)
    return [(name, q, a) for name, (_, q, a) in zip(COMPLEX, [t for t in turns if t[0] == "complex"])]


def baseline_replies(histories: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
    """Plain SmolLM2-135M-Instruct (the default model's converted base), text only: answer + question."""
    import torch

    from anomaly_assistant import default_model
    from anomaly_assistant.prompts import INSPECTION_PROMPT

    model, processor = default_model.build_base()
    model.eval()
    replies = []
    for answer, question in histories:
        messages = [{"role": "user", "content": INSPECTION_PROMPT}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": question}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        replies.append(processor.decode(new, skip_special_tokens=True).strip())
    return replies


def real_items(root: Path, limit: int, seed: int) -> dict[str, list[dict]]:
    """Magnetic tiles (4 good references, `limit` balanced tests) and `limit // 2` DeepPCB pairs."""
    from anomaly_assistant.data_builders.sources import read_deeppcb, read_mvtec
    from anomaly_assistant.eval.ad import reference_paths

    rng = np.random.default_rng(seed)  # which test tiles and pairs

    def pick(recs, n):
        return [recs[i] for i in sorted(rng.choice(len(recs), size=min(n, len(recs)), replace=False))]

    def item(rec, refs, name):
        return {"set": name, "path": rec.image_path, "label": rec.gt_label, "gt_boxes": rec.gt_boxes,
                "gt_type": rec.defect_type, "image": rec.image_path, "refs": refs}

    out: dict[str, list[dict]] = {}
    tiles = root / "magnetic_tile"
    if tiles.is_dir():
        refs = reference_paths(root, "magnetic_tile", N_REFS)
        recs = read_mvtec(tiles, split="test")  # boxes from the masks
        good, bad = [r for r in recs if not r.gt_label], [r for r in recs if r.gt_label]
        chosen = pick(good, limit // 2) + pick(bad, limit - limit // 2)
        out["magnetic_tile"] = [item(r, refs, "magnetic_tile") for r in chosen]
    if (root / "deeppcb").is_dir():
        pairs = pick([r for r in read_deeppcb(root / "deeppcb", include_templates=False) if r.reference_path],
                     max(1, limit // 2))
        out["deeppcb"] = [it for r in pairs for it in (
            item(r, [r.reference_path], "deeppcb"),
            {"set": "deeppcb", "path": r.reference_path, "label": 0, "gt_boxes": [], "gt_type": None,
             "image": r.reference_path, "refs": [r.reference_path], "template": True})]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a trained default-model folder (or an SFT checkpoint)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=7919, help="held-out SynthInspect seed (never 0)")
    parser.add_argument("--per-category", type=int, default=8, help="held-out test images per category")
    parser.add_argument("--followups", type=int, default=10, help="anomalous images asked follow-ups")
    parser.add_argument("--baseline-llm", action="store_true", help="also ask plain SmolLM2-135M-Instruct")
    parser.add_argument("--real-dev", type=Path, help="the real-dev folder (magnetic_tile/, deeppcb/)")
    parser.add_argument("--real-limit", type=int, default=40, help="inspections per real data set")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="inspection answer length")
    parser.add_argument("--followup-tokens", type=int, default=96, help="follow-up reply length, both models")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (on a CPU shared with a job, 2 threads ran 30x slower)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from anomaly_assistant.eval.text_metrics import rouge_l, sbert_cosine

    model_dir = Path(args.model_dir)
    # a pipeline folder, or a checkpoint inside it (sft/checkpoint-N)
    configs = [p / "pipeline_config.json" for p in (model_dir, *model_dir.resolve().parents[:2])]
    config_file = next((c for c in configs if c.is_file()), None)
    data_cfg = json.loads(config_file.read_text()).get("data", {}) if config_file else {}
    if args.seed in (0, data_cfg.get("seed", 0)):
        parser.error(f"--seed {args.seed} is the training data's seed: pick a held-out one")
    size = int(data_cfg.get("synth_size", 128))
    t_load = time.perf_counter()
    assistant = load_assistant(model_dir)
    settings = vars(args) | {"real_dev": str(args.real_dev), "image_size": size, "references": N_REFS,
                             "pipeline_config": str(config_file)}
    result: dict = {"model": str(model_dir), "settings": settings,
                    "load_s": round(time.perf_counter() - t_load, 1)}

    # 1 + 2: held-out SynthInspect, follow-ups asked on the first anomalous images
    items = synth_items(args.seed, size, args.per_category)
    rng = np.random.default_rng(args.seed)
    asked: list[dict] = []

    def ask_followups(it: dict, session) -> None:
        if not it["label"] or len({a["index_key"] for a in asked}) >= args.followups:
            return
        answer, inspection_turns = session.turns[-1].text, list(session.turns)
        for name, question, reference in followup_turns(assistant, it, rng):
            session.turns = list(inspection_turns)  # each question right after the inspection turn
            reply = session.ask(question, max_new_tokens=args.followup_tokens)
            asked.append({"index_key": (it["category"], it["index"]), "category": it["category"],
                          "defect_type": it["gt_type"], "question_kind": name, "question": question,
                          "inspection_answer": answer, "ours": reply, "reference": reference})

    records, seconds = run_items(assistant, items, args.max_new_tokens, ask_followups)
    synth = {"answer": summarise(items, "answer"), "shown": summarise(items, "shown")}
    from anomaly_assistant.data_builders.synth_inspect import CATEGORIES

    synth["per_category"] = {c: summarise([it for it in items if it["category"] == c], "answer")
                             for c in CATEGORIES}
    synth["seconds_per_inspection"] = float(np.mean(seconds))
    synth["items"] = records
    result["synth"] = synth
    table(f"Held-out SynthInspect (seed {args.seed}, {size} px, {N_REFS} references, "
          f"{len(items)} images, {synth['answer']['n_anomalous']} anomalous, "
          f"{synth['seconds_per_inspection']:.1f} s per inspection)",
          {"answer": synth["answer"], "shown to the user": synth["shown"]}, METRICS)

    # 2: score the follow-ups (and the baseline's replies to the same history)
    refs = [a["reference"] for a in asked]
    models = {"ours": [a["ours"] for a in asked]}
    if args.baseline_llm and asked:
        t0 = time.perf_counter()
        models["baseline"] = baseline_replies([(a["inspection_answer"], a["question"]) for a in asked],
                                              args.followup_tokens)
        result["baseline_s"] = round(time.perf_counter() - t0, 1)
        for a, reply in zip(asked, models["baseline"]):
            a["baseline"] = reply
    follow: dict = {"images": len({a["index_key"] for a in asked}), "questions": len(asked)}
    rows = {}
    for name, replies in models.items():
        rouge = [rouge_l(p, r) for p, r in zip(replies, refs)]
        sbert = sbert_cosine(replies, refs) if replies else []
        for a, ro, sb in zip(asked, rouge, sbert):
            a[f"{name}_rouge_l"], a[f"{name}_sbert"] = ro, sb
        rows[name] = {"n": len(replies), "rouge_l": float(np.mean(rouge)) if rouge else None,
                      "sbert": float(np.mean(sbert)) if sbert else None}
        for kind in COMPLEX:
            sel = [i for i, a in enumerate(asked) if a["question_kind"] == kind]
            rows[name][f"rouge_l {kind}"] = float(np.mean([rouge[i] for i in sel])) if sel else None
    follow["figures"] = rows
    for a in asked:
        a.pop("index_key")
    follow["examples"] = [{k: a.get(k) for k in ("question", "ours", "baseline", "reference")}
                          for a in asked[:: max(1, len(asked) // 5)][:5]]
    follow["replies"] = asked
    result["followups"] = follow
    table(f"Follow-up questions ({follow['questions']} on {follow['images']} anomalous images, "
          "reply vs templated reference)", rows,
          ["n", "rouge_l", "sbert"] + [f"rouge_l {k}" for k in COMPLEX])

    # 3: real parts
    if args.real_dev:
        real: dict = {}
        rows = {}
        for name, its in real_items(args.real_dev, args.real_limit, args.seed).items():
            recs, secs = run_items(assistant, its, args.max_new_tokens)
            real[name] = {"answer": summarise(its, "answer"), "shown": summarise(its, "shown"),
                          "seconds_per_inspection": float(np.mean(secs)), "items": recs}
            rows[f"{name}: answer"], rows[f"{name}: shown"] = real[name]["answer"], real[name]["shown"]
            rows[f"{name}: answer"]["s/inspection"] = real[name]["seconds_per_inspection"]
            if name == "deeppcb":  # the defect-free half is each template against itself
                tmpl = [it for it in its if it.get("template")]
                real[name]["templates_called_normal"] = summarise(tmpl, "shown")["accuracy"]
                real[name]["templates_answered_normal"] = summarise(tmpl, "answer")["accuracy"]
        result["real"] = real
        table(f"Real parts ({args.real_dev}; measured only, never tuned on)", rows,
              METRICS[:7] + METRICS[8:10] + ["s/inspection"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
