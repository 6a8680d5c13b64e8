"""The one home of what GRPO rewards and evaluation metrics share, so a reward and its metric cannot drift.

- answers: format validity of a parsed answer, verdict words, verdict correctness;
- labels: confusion-based metrics (accuracy, balanced accuracy, precision, recall, F1), per class, macro;
- boxes: IoU, greedy and Hungarian matching, precision / recall / F1 at an IoU threshold, mean IoU of matches;
- defect types: the taxonomy (canonical names, synonyms, families) and a graded similarity;
- free replies: the verdict a short reply states, VisA-D&R's "yes" rule, multiple-choice letters (MMAD).

Pure functions over plain values: strings, 0/1 labels, boxes as [x1, y1, x2, y2] (x2/y2 exclusive edges,
like `finding.Box`). numpy only, scipy for the Hungarian matching. Nothing from the project is imported
at module load (`exact_layout` reads grammar's tags when called), so `grammar` (verdict words, format
validity) and `finding` (`Box.iou`) build on this module.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from anomaly_assistant.grammar import ParsedAnswer

# ------------------------------------------------------------------------------------ answers and verdicts

# Words that name a verdict: in the grammar's verdict field, a reply to a yes/no question, a label column.
ANOMALOUS_WORDS = frozenset(
    {"anomalous", "anomaly", "abnormal", "defective", "defect", "ng", "bad", "yes", "faulty", "damaged"}
)
NORMAL_WORDS = frozenset(
    {"normal", "good", "ok", "okay", "no", "defect-free", "defect free", "nominal", "pass", "clean"}
)
_VERDICT_WORD = re.compile(
    r"(?<![\w-])(" + "|".join(sorted(map(re.escape, ANOMALOUS_WORDS | NORMAL_WORDS), key=len, reverse=True))
    + r")(?![\w-])"
)


def _plain(text: str) -> str:
    """Compatibility-normalised lower case: full-width or styled letters read as ASCII ("ＹＥＳ" -> "yes")."""
    return unicodedata.normalize("NFKC", text).lower()


def verdict_word(value: str) -> str | None:
    """The verdict one word names ("Defective." -> "anomalous", "OK" -> "normal"); None for other values."""
    word = _plain(value).strip().strip(".!")
    if word in ANOMALOUS_WORDS:
        return "anomalous"
    if word in NORMAL_WORDS:
        return "normal"
    return None


def read_verdict(text: str) -> str | None:
    """The verdict a short reply states: its first verdict word ("Yes, there is an anomaly." -> "anomalous").

    Words count whole only ("no" inside "anomaly" does not); negations beyond a leading "no" are not
    understood, so this reads answers to yes/no questions, not essays.
    """
    match = _VERDICT_WORD.search(_plain(text))
    return verdict_word(match.group(1)) if match else None


def is_yes(reply: str) -> bool:
    """VisA-D&R's detection rule, verbatim for comparable figures: a reply containing "yes" is anomalous."""
    return "yes" in reply.lower()


def verdict_correct(verdict: str | None, gt_label: int) -> bool:
    """Whether a verdict ("normal" / "anomalous"; None when unreadable) matches a 0/1 ground-truth label."""
    return verdict == ("anomalous" if gt_label else "normal")


def format_ok(parsed: ParsedAnswer) -> bool:
    """Whether a parsed answer follows the grammar exactly (the format reward and the expert fallback ask).

    Exactly: an <answer> block holding a JSON object with a verdict, and nothing the parser had to repair
    (`parsed.problems` lists what it repaired).
    """
    return parsed.has_answer_block and parsed.json_ok and parsed.verdict is not None and not parsed.problems


def exact_layout(text: str) -> bool:
    """Whether text is one <think>…</think> then one <answer>…</answer> and nothing else (the format reward).

    Stricter than `format_ok`, which accepts what the parser can read (it takes the last of two answer blocks
    and ignores text around them). String scans only: linear time on any input.
    """
    from anomaly_assistant import grammar  # here, not at the top: grammar imports this module


    text = text.strip()
    tags = (grammar.THINK_OPEN, grammar.THINK_CLOSE, grammar.ANSWER_OPEN, grammar.ANSWER_CLOSE)
    if any(text.count(tag) != 1 for tag in tags):
        return False
    between = text[text.index(grammar.THINK_CLOSE) + len(grammar.THINK_CLOSE):text.index(grammar.ANSWER_OPEN)]
    return text.startswith(grammar.THINK_OPEN) and text.endswith(grammar.ANSWER_CLOSE) and not between.strip()


_NEGATED = re.compile(
    r"(?:(?<![\w-])(?:no|not|nor|without|never|free of|absence of)|n['\u2019]t)(?:\s+[\w-]+){0,2}\s+$"
)


def concluded_verdict(text: str) -> str | None:
    """The verdict a reasoning text ends on: its last verdict word, flipped after a negation (else None).

    Reasoning states its conclusion last ("… no scratch or crack, so it is normal."); a negation within two
    words before the verdict word flips it ("no visible defect" -> normal, "not normal" -> anomalous).

    >>> [concluded_verdict(t) for t in ("Dark line at the top: anomalous.", "There is no visible defect.")]
    ['anomalous', 'normal']
    """
    plain = _plain(text)
    last = None
    for match in _VERDICT_WORD.finditer(plain):
        last = match
    if last is None:
        return None
    verdict = verdict_word(last.group(1))
    if _NEGATED.search(plain[max(0, last.start() - 60):last.start()]):
        verdict = "normal" if verdict == "anomalous" else "anomalous"
    return verdict


# --------------------------------------------------------------------------------------- binary labels

BINARY_KEYS = ("accuracy", "precision", "recall", "f1", "false_alarm_rate")


def binary_metrics(gt_labels: Sequence[int], pred_labels: Sequence[int]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 with anomalous = positive, plus the confusion counts.

    Precision (recall) is 0.0 when nothing is predicted (present) positive, as scikit-learn's
    `zero_division=0`; F1 is 0.0 when precision + recall is 0. The false-alarm rate (the share of normal
    parts flagged, what an inspector pays for a threshold) is None without normal parts.
    """
    y = np.asarray(gt_labels, dtype=np.int64).ravel()
    p = np.asarray(pred_labels, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.shape[0]} labels vs {p.shape[0]} predictions")
    tp = int(((y == 1) & (p == 1)).sum())
    fp = int(((y == 0) & (p == 1)).sum())
    tn = int(((y == 0) & (p == 0)).sum())
    fn = int(((y == 1) & (p == 0)).sum())
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_alarm_rate": fp / (fp + tn) if fp + tn else None,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }


def balanced_accuracy(gt_labels: Sequence[int], correct: Sequence[bool]) -> float | None:
    """Mean over the classes present of the share of their items answered correctly; None when empty.

    For labels and predictions pass `correct = [p == y ...]`: (TPR + TNR) / 2. Taking correctness rather than
    predictions also scores multiple-choice detection questions (MMAD's "Anomaly Detection").
    """
    y = np.asarray(gt_labels).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if y.shape != ok.shape:
        raise ValueError(f"{y.shape[0]} labels vs {ok.shape[0]} answers")
    classes = np.unique(y)
    return float(np.mean([ok[y == c].mean() for c in classes])) if classes.size else None


def per_class_binary(
    categories: Sequence[str], gt_labels: Sequence[int], pred_labels: Sequence[int]
) -> tuple[dict[str, dict[str, Any]], dict[str, float | None]]:
    """Binary metrics per class and their macro average (the VisA-D&R way: average the per-class numbers)."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        groups.setdefault(str(c), []).append(i)
    y = np.asarray(gt_labels)
    p = np.asarray(pred_labels)
    per_class = {c: binary_metrics(y[idx], p[idx]) for c, idx in sorted(groups.items())}
    return per_class, macro_average(per_class)


def macro_average(
    per_class: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = BINARY_KEYS
) -> dict[str, float | None]:
    """Mean of each key over the classes where it is defined."""
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [float(m[k]) for m in per_class.values() if m.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


# ----------------------------------------------------------------------------------------------- boxes


def iou_matrix(boxes_a: Sequence[Sequence[float]], boxes_b: Sequence[Sequence[float]]) -> np.ndarray:
    """Intersection over union of every pair, [len(a), len(b)]; 0.0 where the union is empty."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)  # [A, 4]
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)  # [B, 4]
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy  # [A, B]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # [A]
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # [B]
    union = area_a[:, None] + area_b[None, :] - inter  # [A, B]
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0.0 when both are empty)."""
    return float(iou_matrix([box_a], [box_b])[0, 0])


def match_boxes(
    predicted: Sequence[Sequence[float]], target: Sequence[Sequence[float]], iou_threshold: float = 0.5,
    method: str = "hungarian",
) -> list[tuple[int, int, float]]:
    """One-to-one matches (predicted index, target index, IoU), each with IoU >= `iou_threshold` and > 0.

    "hungarian" maximises the summed IoU of admissible pairs (scipy `linear_sum_assignment`), so one box
    cannot steal the only partner of another; "greedy" takes pairs in descending IoU, as simple detection
    scorers do. Matches are sorted by predicted index.
    """
    iou = iou_matrix(predicted, target)  # [P, T]
    admissible = (iou >= iou_threshold) & (iou > 0)
    if not admissible.any():
        return []
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(np.where(admissible, iou, 0.0), maximize=True)
        pairs = [(int(r), int(c)) for r, c in zip(rows, cols) if admissible[r, c]]
    elif method == "greedy":
        pairs, used_p, used_t = [], set(), set()
        flat = np.argsort(-iou, axis=None, kind="stable")
        for r, c in zip(*np.unravel_index(flat, iou.shape)):
            if admissible[r, c] and r not in used_p and c not in used_t:
                pairs.append((int(r), int(c)))
                used_p.add(r)
                used_t.add(c)
    else:
        raise ValueError(f"method must be 'hungarian' or 'greedy', got {method!r}")
    return sorted((r, c, float(iou[r, c])) for r, c in pairs)


@dataclass(frozen=True)
class BoxScores:
    """How predicted boxes cover the target boxes of one image at one IoU threshold."""

    matches: list[tuple[int, int, float]]
    n_predicted: int
    n_target: int
    precision: float
    recall: float
    f1: float
    mean_iou: float | None  # over the matches; None without any


def box_scores(
    predicted: Sequence[Sequence[float]], target: Sequence[Sequence[float]], iou_threshold: float = 0.5,
    method: str = "hungarian",
) -> BoxScores:
    """Precision, recall and F1 of box matching (see `match_boxes`) and the mean IoU of the matches.

    With no predicted boxes precision is 1.0 only when there is nothing to find; with no target boxes recall
    is 1.0 only when nothing was predicted: a normal image answered without boxes scores 1.0 throughout.
    """
    matches = match_boxes(predicted, target, iou_threshold, method)
    n_pred, n_target, n_match = len(predicted), len(target), len(matches)
    precision = n_match / n_pred if n_pred else float(n_target == 0)
    recall = n_match / n_target if n_target else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mean_iou = float(np.mean([m[2] for m in matches])) if matches else None
    return BoxScores(matches, n_pred, n_target, precision, recall, f1, mean_iou)


# --------------------------------------------------------------------------------------- defect types

# Family -> substrings of a defect name that put it there; the first family with a hit wins, so order matters.
# Any dataset's name maps in: MVTec `broken_large`, VisA "chunk of wax missing", DeepPCB `mousebite`.
DEFECT_FAMILIES: dict[str, tuple[str, ...]] = {
    "scratch": ("scratch", "scrape", "abrasion", "rub", "scuff", "mark"),
    "crack": ("crack", "fracture", "fissure", "split"),
    "missing": ("missing", "broken", "break", "chip", "absent", "lack", "damaged_thread", "rim", "open",
                "mousebite", "cut_lead"),
    "hole": ("hole", "pit", "pore", "poke", "blowhole", "pinhole", "pin-hole", "puncture", "void"),
    "contamination": ("stain", "contamin", "dirt", "oil", "spot", "glue", "liquid", "residue", "smudge",
                      "copper"),
    "foreign_object": ("foreign", "thread", "hair", "fiber", "fibre", "particle", "debris", "short"),
    "deformation": ("bent", "dent", "deform", "squeeze", "fold", "warp", "uneven", "fray", "wrinkle", "spur",
                    "rough"),
    "misplacement": ("misplac", "flip", "swap", "misalign", "misweave", "shift", "rotate", "wrong", "patch",
                     "combined"),
    "discolouration": ("colo", "discolo", "corrosion", "rust", "irregular", "variation", "burn", "faded",
                       "print"),
    "cut": ("cut", "slash", "tear", "gash", "notch"),
}
OTHER_FAMILY = "other"  # a name no family claims

# Names a model might use for the same defect (the synonym tier of `type_similarity`), in canonical form.
DEFECT_SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"scratch", "scrape", "abrasion", "scuff"}),
    frozenset({"crack", "fracture", "fissure"}),
    frozenset({"hole", "pit", "pore", "pinhole", "pin hole", "blowhole", "puncture", "poke"}),
    frozenset({"stain", "contamination", "dirt", "smudge", "spot", "residue"}),
    frozenset({"foreign object", "debris", "particle", "foreign material", "contamination"}),
    frozenset({"missing part", "missing", "broken", "chip", "broken edge", "broken rim", "broken large",
               "broken small"}),
    frozenset({"bent", "deformation", "dent", "deformed", "bent wire"}),
    frozenset({"misplaced patch", "misplaced", "misalignment", "misweave"}),
    frozenset({"discolouration", "discoloration", "color", "colour", "colour variation",
               "surface irregularity"}),
    frozenset({"open", "open circuit"}),
    frozenset({"short", "short circuit"}),
)


def canonical_defect(defect_type: str | None) -> str | None:
    """The written form of a defect name: lower case, single spaces (`broken_large` -> `broken large`)."""
    if defect_type is None:
        return None
    text = re.sub(r"[_\s]+", " ", str(defect_type)).strip().lower()
    return text or None


def defect_family(defect_type: str | None) -> str:
    """The family a defect name belongs to (`OTHER_FAMILY` when no keyword matches)."""
    name = (defect_type or "").lower().replace(" ", "_")
    for family, keywords in DEFECT_FAMILIES.items():
        if any(k in name for k in keywords):
            return family
    return OTHER_FAMILY


def type_similarity(predicted: str | None, target: str | None) -> float:
    """Graded agreement of two defect names: exact 1.0, synonym 0.85, same family 0.6, else 0.0.

    >>> pairs = [("broken_large", "broken large"), ("pit", "hole"), ("fold", "bent"), ("scratch", "hole")]
    >>> [type_similarity(a, b) for a, b in pairs]
    [1.0, 0.85, 0.6, 0.0]
    """
    a, b = canonical_defect(predicted), canonical_defect(target)
    if a is None or b is None:
        return 1.0 if a == b else 0.0
    if a == b:
        return 1.0
    if any(a in group and b in group for group in DEFECT_SYNONYMS):
        return 0.85
    family = defect_family(a)
    return 0.6 if family != OTHER_FAMILY and family == defect_family(b) else 0.0


# ------------------------------------------------------------------------------- multiple-choice replies


class Choice(NamedTuple):
    """The option a reply chose (None: empty reply or no options) and the rule that read it."""

    letter: str | None
    read_by: str  # "letter", "option text", "closest option text" or "nothing"


def read_choice(reply: str, options: Mapping[str, Any]) -> Choice:
    r"""The option letter a reply chooses, read as MMAD's query scripts read it, with care where they slip.

    MMAD: a standalone capital letter (`\b[A-E]\b`; LLaVA's script takes the first, as here, GPT-4o's and
    Qwen's the last), else the option whose text is closest to the reply (`difflib.get_close_matches(...,
    cutoff=0.0)`), so every non-empty reply names an option. Where MMAD's rule misreads a reply: a reply that
    is only a letter counts in any case ("b", "(b)"); a letter stands alone against ASCII letters and digits
    ("答案：B" names B) and must be one of the options; an "A" followed by a lowercase word is the article ("A
    scratch is visible.") and counts only when no option text does; before the closest text comes the option
    whose whole text the reply contains as words, when exactly one does ("There is no defect." -> "No", where
    difflib picks "Yes"). Full-width and other compatibility characters read as their ASCII forms.
    """
    letters = sorted(str(k) for k in options)
    text = unicodedata.normalize("NFKC", reply).strip()
    if not letters or not text:
        return Choice(None, "nothing")
    alt = "|".join(map(re.escape, letters))
    only = re.fullmatch(rf"[(\[]?({alt})[)\]]?[.:)]?", text, flags=re.IGNORECASE)
    if only:
        return Choice(next(k for k in letters if k.lower() == only.group(1).lower()), "letter")
    article = False
    for m in re.finditer(rf"(?<![A-Za-z0-9])({alt})(?![A-Za-z0-9])", text):
        if m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]):
            article = True
            continue
        return Choice(m.group(1), "letter")
    named = [k for k in letters if _says(text, str(options[k]))]
    if len(named) == 1:
        return Choice(named[0], "option text")
    if article:
        return Choice("A", "letter")
    texts = {str(options[k]): k for k in reversed(letters)}  # the first letter wins a shared text
    closest = difflib.get_close_matches(text, list(texts), n=1, cutoff=0.0)[0]  # cutoff 0: always one
    return Choice(texts[closest], "closest option text")


def _says(text: str, option: str) -> bool:
    """Whether text contains an option's whole text as words (case-insensitive, a final full stop ignored)."""
    phrase = _plain(option).strip().rstrip(".")
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", _plain(text)) is not None
