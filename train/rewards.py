"""GRPO rewards in TRL's reward-function signature, each a thin wrapper over `anomaly_assistant.scoring`.

A reward is `reward(completions, **columns) -> list[float | None]`: one value per completion, None where the
term does not apply (TRL leaves None out of that reward's mean and counts it 0 in the weighted total).
Completions arrive as `[{"role": "assistant", "content": str}]` lists (conversational prompts) or strings.
The columns are the GRPO export of `data build` (`data_builders/export.py`, `grpo_row`): `gt_label` (0/1),
`defect_type` (canonical words, None for normal images), `solution_boxes` (model-input frame) and `frame`
(JSON of the `Frame`; its input size clips predicted boxes, so a box outside the image covers nothing).

Every rule (format validity, verdict reading and correctness, box matching and IoU, defect-type grades, the
verdict a reasoning text concludes) lives in `scoring`, which evaluation uses too, so reward and metric cannot
drift. An answer whose verdict cannot be read scores 0 on every answer term; length and repetition still
apply. Weights are starting points from `notes/grpo-rewards.md`; `RewardConfig` carries them into the config.

>>> from anomaly_assistant.grammar import render_answer
>>> good = render_answer("A dark line at the top: anomalous.", "anomalous", "scratch", [[10, 4, 60, 12]], "r")
>>> frame = '{"original_size": [64, 64], "input_size": [64, 64], "scale": ["1", "1"]}'
>>> localization_reward([good], gt_label=[1], solution_boxes=[[[10, 4, 60, 12]]], frame=[frame])
[1.0]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from anomaly_assistant import scoring
from anomaly_assistant.finding import Frame
from anomaly_assistant.grammar import ParsedAnswer, parse_answer

Reward = Callable[..., list[float | None]]


def _weight(default: float, term: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": f"weight of {term} in the total (0: off)"})


@dataclasses.dataclass
class RewardConfig:
    """Weights of the reward terms in the total (0 leaves a term out) and the length budget."""

    format: float = _weight(0.25, "the format reward")
    verdict: float = _weight(1.0, "the class-balanced verdict reward")
    localization: float = _weight(0.5, "the box IoU reward")
    defect_type: float = _weight(0.25, "the graded defect-type reward")
    consistency: float = _weight(0.25, "the think/answer agreement")
    length: float = _weight(0.1, "the soft over-length penalty")
    repetition: float = _weight(0.1, "the n-gram repetition penalty")
    max_chars: int = dataclasses.field(
        default=1500, metadata={"help": "completions longer than this lose length reward (0 at twice it)"}
    )


def reward_terms(config: RewardConfig) -> dict[str, tuple[Reward, float]]:
    """Term name -> (reward callable, weight) for the terms with a nonzero weight, in a fixed order."""
    terms: dict[str, Reward] = {
        "format": format_reward,
        "verdict": verdict_reward,
        "localization": localization_reward,
        "defect_type": defect_type_reward,
        "consistency": consistency_reward,
        "length": functools.partial(length_reward, max_chars=config.max_chars),
        "repetition": repetition_reward,
    }
    return {name: (fn, float(getattr(config, name))) for name, fn in terms.items() if getattr(config, name)}


def reward_functions(config: RewardConfig) -> tuple[list[Reward], list[float]]:
    """The reward callables with a nonzero weight, and their weights in order (GRPOConfig.reward_weights)."""
    chosen = reward_terms(config).values()
    return [fn for fn, _ in chosen], [w for _, w in chosen]


def reward_report(completions: Sequence[Any], config: RewardConfig, **columns: Any) -> dict[str, Any]:
    """The figures that compare checkpoints on held-out prompts, scored as GRPO scores a batch.

    `reward`: the mean total (weights × terms, a None term counting 0), and `totals`, each completion's total
    (for paired comparisons of two checkpoints on the same prompts, `paired_gain`); per term, its mean over
    the completions it applies to (over a whole set, the verdict term's mean is the balanced accuracy); and
    the verdict rates of `verdict_metrics`.
    """
    report: dict[str, Any] = {"n": len(completions)}
    totals = [0.0] * len(completions)
    for name, (fn, weight) in reward_terms(config).items():
        values = fn(completions, **columns)
        totals = [t + weight * v if v is not None else t for t, v in zip(totals, values)]
        applied = [v for v in values if v is not None]
        report[name] = sum(applied) / len(applied) if applied else None
    report["reward"] = sum(totals) / len(totals) if totals else None
    report["totals"] = totals
    return report | {f"verdict/{k}": v for k, v in verdict_metrics(completions, columns["gt_label"]).items()}


def paired_gain(before: Sequence[float], after: Sequence[float], confidence: float = 0.95,
                resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of `after - before` over the same prompts and its bootstrap confidence interval.

    Two checkpoints answer the same held-out prompts, so their per-prompt totals (`reward_report`'s
    `totals`) pair up; a gain whose interval stays above 0 is one the held-out set can tell from noise.
    """
    import numpy as np
    from scipy.stats import bootstrap

    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if diff.ndim != 1 or len(before) != len(after) or diff.size < 2:
        raise ValueError(f"need two equally long lists of >= 2 totals, got {len(before)} and {len(after)}")
    if np.all(diff == diff[0]):  # no spread: the interval is the point
        return {"gain": float(diff[0]), "low": float(diff[0]), "high": float(diff[0]), "n": int(diff.size)}
    ci = bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=resamples,
                   method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    return {"gain": float(diff.mean()), "low": float(ci.low), "high": float(ci.high), "n": int(diff.size)}


# ------------------------------------------------------------------------------------------ reading


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the last message of a message list (str or text parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


@functools.lru_cache(maxsize=1024)
def _parsed(text: str) -> ParsedAnswer:
    """One parse per completion text for all rewards of a batch (up to 1024 completions; never mutated)."""
    return parse_answer(text)


def _answers(completions: Sequence[Any]) -> list[ParsedAnswer]:
    return [_parsed(completion_text(c)) for c in completions]


def _readable(parsed: ParsedAnswer) -> bool:
    """Whether the answer block held a JSON object with a verdict: the gate of every answer term."""
    return parsed.json_ok and parsed.verdict is not None


@functools.lru_cache(maxsize=1024)
def _input_size(frame_json: str | None) -> tuple[int, int] | None:
    if not frame_json:
        return None
    return Frame.from_json(json.loads(frame_json)).input_size


# ------------------------------------------------------------------------------------------ rewards


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """How closely a completion follows the grammar, graded so that partial progress pays.

    1.0 for the exact layout (`scoring.exact_layout`), 0.5 when it reads cleanly (`scoring.format_ok`) but
    with text or blocks around it, 0.25 when only the verdict could be read (repairs needed), else 0.0.
    """
    out = []
    for completion in completions:
        text = completion_text(completion)
        parsed = _parsed(text)
        if scoring.format_ok(parsed):
            out.append(1.0 if scoring.exact_layout(text) else 0.5)
        else:
            out.append(0.25 if _readable(parsed) else 0.0)
    return out


def verdict_reward(
    completions: Sequence[Any],
    gt_label: Sequence[int],
    log_metric: Callable[[str, float], None] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Correct verdict (`scoring.verdict_correct`), class-balanced: the batch mean is the balanced accuracy.

    So a constant "normal" policy earns 0.5 however few anomalous images a batch holds.

    Each class present gets weight N / (classes present × its count). With TRL's per-group std scaling the
    weight mostly sets this term's share of the total within a group (a group shares one image, hence one
    class); with `scale_rewards="batch"` or `"none"` it also balances the classes' advantages.
    Given TRL's `log_metric`, logs accuracy, miss rate and false-alarm rate (see `verdict_metrics`).
    """
    answers = _answers(completions)
    labels = [int(y) for y in gt_label]
    counts = {c: labels.count(c) for c in set(labels)}
    weight = {c: len(labels) / (len(counts) * n) for c, n in counts.items()}
    if log_metric is not None:
        for name, value in verdict_metrics(completions, labels).items():
            if value is not None:
                log_metric(f"verdict/{name}", value)
    return [weight[y] * float(scoring.verdict_correct(a.verdict, y)) for a, y in zip(answers, labels)]


def verdict_metrics(completions: Sequence[Any], gt_label: Sequence[int]) -> dict[str, float | None]:
    """Accuracy, miss rate and false-alarm rate of a batch, reported apart since an average hides misses.

    Miss rate: anomalous images not called anomalous; false-alarm rate: normal images called anomalous; a rate
    is None when its class is absent. Unreadable answers are wrong and count as "not anomalous".
    """
    labels = [int(y) for y in gt_label]
    answers = _answers(completions)
    metrics = scoring.binary_metrics(labels, [int(a.verdict == "anomalous") for a in answers])
    correct = [scoring.verdict_correct(a.verdict, y) for a, y in zip(answers, labels)]
    positives, negatives = metrics["tp"] + metrics["fn"], metrics["fp"] + metrics["tn"]
    return {
        "accuracy": sum(correct) / len(correct) if correct else None,
        "miss_rate": metrics["fn"] / positives if positives else None,
        "false_alarm_rate": metrics["fp"] / negatives if negatives else None,
    }


def localization_reward(
    completions: Sequence[Any], gt_label: Sequence[int], solution_boxes: Sequence[Sequence[Sequence[float]]],
    frame: Sequence[str | None], **kwargs: Any,
) -> list[float | None]:
    """Dense box agreement in the model-input frame (no IoU step: small defects still give a gradient).

    0.7 × mean IoU of the Hungarian-matched pairs (any overlap matches) + 0.3 × (1 − mean(miss rate,
    false-box rate)), from `scoring.box_scores`.

    A normal image rewards an empty box list (1.0, else 0.0); an anomalous image without target boxes (an
    image-level label) gives None. Predicted boxes are clipped to the input image first, so a box outside it
    is a false box, and huge coordinates cannot inflate an IoU.
    """
    out: list[float | None] = []
    for parsed, label, target, frame_json in zip(_answers(completions), gt_label, solution_boxes, frame):
        if int(label) and not target:
            out.append(None)
            continue
        if not _readable(parsed):
            out.append(0.0)
            continue
        size = _input_size(frame_json)
        boxes = [b.clip(*size) if size else b for b in parsed.boxes]
        predicted = [b.as_list() for b in boxes if b.area > 0]
        if not target:
            out.append(float(not parsed.boxes))
            continue
        scores = scoring.box_scores(predicted, [list(b) for b in target], iou_threshold=0.0)
        cover = 1.0 - ((1.0 - scores.recall) + (1.0 - scores.precision)) / 2
        out.append(0.7 * (scores.mean_iou or 0.0) + 0.3 * cover)
    return out


def defect_type_reward(
    completions: Sequence[Any], gt_label: Sequence[int], defect_type: Sequence[str | None], **kwargs: Any
) -> list[float | None]:
    """Graded defect type (`scoring.type_similarity`: exact 1.0, synonym 0.85, same family 0.6).

    Applies when the image is anomalous and the answer says so; 0.0 when the answer misses the defect; None
    for normal or untyped images.
    """
    out: list[float | None] = []
    for parsed, label, target in zip(_answers(completions), gt_label, defect_type):
        if not int(label) or not target:
            out.append(None)
        elif parsed.verdict != "anomalous" or not _readable(parsed):
            out.append(0.0)
        else:
            out.append(scoring.type_similarity(parsed.defect_type, target))
    return out


def consistency_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the <think> text concludes the answer's verdict (`scoring.concluded_verdict`), else 0.0.

    The reasoning may not argue for one verdict and answer the other; a missing conclusion scores 0.0 too.
    """
    return [
        float(_readable(p) and scoring.concluded_verdict(p.think) == p.verdict) for p in _answers(completions)
    ]


def length_reward(completions: Sequence[Any], max_chars: int = 1500, **kwargs: Any) -> list[float]:
    """1.0 up to `max_chars` characters, then falling linearly to 0.0 at twice that (a soft budget)."""
    return [
        max(0.0, min(1.0, 2.0 - len(completion_text(c)) / max(1, max_chars))) for c in completions
    ]


_WORD = re.compile(r"\w+")
_MAX_WORDS = 50_000  # bounded work on adversarial completions; more words than this is degenerate anyway


def repetition_reward(completions: Sequence[Any], ngram: int = 4, **kwargs: Any) -> list[float]:
    """Share of distinct word n-grams, rescaled so that up to 20 % repeats cost nothing.

    A looping completion ("scratch scratch scratch …") scores near 0.0, a long text said twice about 0.63.
    """
    out = []
    for completion in completions:
        words = _WORD.findall(completion_text(completion).lower()[: _MAX_WORDS * 16])[:_MAX_WORDS]
        grams = list(zip(*(words[i:] for i in range(ngram))))
        out.append(min(1.0, len(set(grams)) / (0.8 * len(grams))) if grams else 1.0)
    return out
