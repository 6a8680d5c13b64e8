"""GRPO rewards: each term on valid, wrong and adversarial completions, in both shapes TRL passes."""

import json
import math
import time

import pytest

from anomaly_assistant import scoring
from anomaly_assistant.finding import Frame
from anomaly_assistant.grammar import render_answer
from anomaly_assistant.train import rewards
from anomaly_assistant.train.rewards import (
    RewardConfig,
    completion_text,
    consistency_reward,
    defect_type_reward,
    format_reward,
    length_reward,
    localization_reward,
    repetition_reward,
    reward_functions,
    verdict_metrics,
    verdict_reward,
)

FRAME = json.dumps(Frame.resize((128, 96), (112, 84)).to_json())  # solution boxes live in the 112x84 input
TARGET = [[10.0, 8.0, 40.0, 30.0], [70.0, 50.0, 100.0, 80.0]]
ANOMALOUS = render_answer("A dark line at the top left: anomalous.", "anomalous", "scratch", TARGET, "lines")
NORMAL = render_answer("Regular texture, no scratch or stain, so it is normal.", "normal")


def as_message(text):
    return [{"role": "assistant", "content": text}]


def columns(label, n=1, boxes=None, defect="scratch"):
    """Solution columns of `n` completions of one image, as TRL passes them (one value per completion)."""
    boxes = (TARGET if label else []) if boxes is None else boxes
    return {"gt_label": [label] * n, "solution_boxes": [boxes] * n, "frame": [FRAME] * n,
            "defect_type": [defect if label else None] * n}


ADVERSARIAL = [
    "",
    ANOMALOUS[: len(ANOMALOUS) // 2],  # truncated mid-JSON
    ANOMALOUS + ANOMALOUS.replace("anomalous", "normal"),  # two answer blocks
    '<think>x</think><answer>{"verdict": "anomalous", "defect_type": "scratch", '
    '"boxes": [[1e308, -1e308, 1e309, 5]], "rationale": ""}</answer>',  # huge numbers, an infinity
    '<think>x</think><answer>{"verdict": "anomalous", "defect_type": "scratch", '
    '"boxes": [["NaN", "nan", NaN, 4]], "rationale": NaN}</answer>',  # NaN strings and literals
    '<think>Ｄｅｆｅｃｔ：裂纹 🔧</think><answer>{"verdict": "异常", "boxes": []}</answer>',  # non-ASCII
    "<answer>" * 5000 + "{" * 5000,  # nested garbage
    None,
    [{"role": "assistant", "content": [{"type": "text", "text": NORMAL}]}],  # content as parts
]


# ------------------------------------------------------------------------------------------ shapes


def test_completion_text_accepts_strings_messages_and_parts():
    assert completion_text(NORMAL) == NORMAL
    assert completion_text(as_message(NORMAL)) == NORMAL
    assert completion_text(ADVERSARIAL[-1]) == NORMAL
    assert completion_text(None) == "" and completion_text([]) == ""


@pytest.mark.parametrize("fn", [format_reward, verdict_reward, localization_reward, defect_type_reward,
                                consistency_reward, length_reward, repetition_reward])
def test_every_reward_takes_trl_arguments_and_both_shapes(fn):
    cols = columns(1, n=2)
    extra = {"prompts": [[{"role": "user", "content": "q"}]] * 2, "completion_ids": [[1], [2]],
             "trainer_state": None, "verdict": ["anomalous"] * 2, "answer": [ANOMALOUS] * 2}
    assert fn([ANOMALOUS, as_message(ANOMALOUS)], **cols, **extra) == fn([ANOMALOUS] * 2, **cols, **extra)


@pytest.mark.parametrize("fn", [format_reward, verdict_reward, localization_reward, defect_type_reward,
                                consistency_reward, length_reward, repetition_reward])
def test_adversarial_completions_score_finite_and_bounded(fn):
    n = len(ADVERSARIAL)
    for label in (0, 1):
        values = fn(ADVERSARIAL, **columns(label, n))
        assert len(values) == n
        assert all(v is None or (math.isfinite(v) and 0.0 <= v <= 2.0) for v in values), values


def test_a_100kb_completion_scores_in_bounded_time():
    huge = ["<think>" + "scratch " * 12_500 + "</think><answer>{" + '"a": [' * 2000,
            ANOMALOUS + "x" * 100_000, "{" * 100_000]
    start = time.perf_counter()
    for fn in (format_reward, verdict_reward, localization_reward, defect_type_reward, consistency_reward,
               length_reward, repetition_reward):
        fn(huge, **columns(1, len(huge)))
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------------------ format


def test_format_grades_exact_readable_repaired_and_broken():
    repaired = ANOMALOUS.replace('"rationale": "lines"', '"extra": 1')  # a required key missing
    got = format_reward([ANOMALOUS, "Sure! " + ANOMALOUS, ANOMALOUS + ANOMALOUS, repaired, "anomalous", ""])
    assert got == [1.0, 0.5, 0.5, 0.25, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ verdict


def test_verdict_balanced_so_a_constant_normal_policy_does_not_win():
    labels = [0] * 9 + [1]  # 9 normal images for 1 anomalous one
    always_normal = verdict_reward([NORMAL] * 10, gt_label=labels)
    always_right = verdict_reward([NORMAL] * 9 + [ANOMALOUS], gt_label=labels)
    assert sum(always_normal) / 10 == pytest.approx(0.5)  # the balanced accuracy, not the 0.9 accuracy
    assert sum(always_right) / 10 == pytest.approx(1.0)
    assert always_right[-1] > always_right[0]  # the rare class weighs more per completion
    mixed = [NORMAL, ANOMALOUS, NORMAL, NORMAL] * 2 + [ANOMALOUS, NORMAL]
    mixed_labels = [0, 1, 1, 0, 0, 0, 1, 0, 1, 1]
    correct = [scoring.verdict_correct(v, y) for v, y in zip(["normal", "anomalous", "normal", "normal"] * 2
                                                               + ["anomalous", "normal"], mixed_labels)]
    mean = sum(verdict_reward(mixed, gt_label=mixed_labels)) / 10
    assert mean == pytest.approx(scoring.balanced_accuracy(mixed_labels, correct))


def test_verdict_unreadable_is_wrong_and_single_class_batches_weigh_one():
    assert verdict_reward([ANOMALOUS, "", "anomalous?"], gt_label=[1, 1, 1]) == [1.0, 0.0, 0.0]
    assert verdict_reward([NORMAL, ANOMALOUS], gt_label=[0, 0]) == [1.0, 0.0]


def test_verdict_logs_accuracy_miss_and_false_alarm_rates():
    logged = {}
    completions = [ANOMALOUS, NORMAL, NORMAL, ANOMALOUS, ""]
    labels = [1, 1, 0, 0, 1]
    verdict_reward(completions, gt_label=labels, log_metric=lambda k, v: logged.setdefault(k, v))
    assert logged == {"verdict/accuracy": pytest.approx(2 / 5), "verdict/miss_rate": pytest.approx(2 / 3),
                      "verdict/false_alarm_rate": pytest.approx(1 / 2)}
    assert verdict_metrics([NORMAL], [0]) == {"accuracy": 1.0, "miss_rate": None, "false_alarm_rate": 0.0}


# ------------------------------------------------------------------------------------------ localization


def test_localization_is_dense_and_matches_several_boxes():
    def answer(boxes):
        return render_answer("defect: anomalous", "anomalous", "scratch", boxes, "r")

    shifted = [[b[0] + 6, b[1], b[2] + 6, b[3]] for b in TARGET]
    got = localization_reward([answer(TARGET), answer(TARGET[::-1]), answer(shifted), answer(TARGET[:1]),
                               answer(TARGET + [[0, 0, 5, 5]]), answer([[0, 60, 5, 70]]), NORMAL],
                              **columns(1, 7))
    exact, swapped, near, one_missing, one_extra, elsewhere, said_normal = got
    assert exact == swapped == 1.0  # Hungarian matching: the order of boxes does not matter
    assert 0.5 < near < 1.0  # a small shift loses a little, not everything (no IoU > 0.5 step)
    assert one_missing == pytest.approx(0.7 + 0.3 * 0.75)  # recall 1/2, precision 1
    assert one_extra == pytest.approx(0.7 + 0.3 * (1 - 1 / 6))  # recall 1, precision 2/3
    assert elsewhere == said_normal == 0.0


def test_localization_compares_in_the_input_frame_and_clips_to_the_image():
    inside = render_answer("anomalous", "anomalous", "scratch", [[100, 70, 112, 84]], "r")
    spilling = render_answer("anomalous", "anomalous", "scratch", [[100, 70, 5000, 9000]], "r")
    outside = render_answer("anomalous", "anomalous", "scratch", [[200, 200, 300, 300]], "r")
    target = [[[100.0, 70.0, 112.0, 84.0]]] * 3
    got = localization_reward([inside, spilling, outside], gt_label=[1] * 3, solution_boxes=target,
                              frame=[FRAME] * 3)
    assert got[0] == got[1] == 1.0  # clipped to the 112x84 input, the spilling box is the target
    assert got[2] == pytest.approx(0.3 * 0.0)


def test_localization_on_normal_images_rewards_no_boxes_and_skips_unboxed_defects():
    assert localization_reward([NORMAL, ANOMALOUS, ""], **columns(0, 3)) == [1.0, 0.0, 0.0]
    assert localization_reward([ANOMALOUS], **columns(1, 1, boxes=[])) == [None]


def test_the_exports_own_answers_earn_every_reward(grpo_train):
    """The export's target answers score perfectly on its own solution columns: names and frames agree."""
    cols = {k: grpo_train[k] for k in ("gt_label", "solution_boxes", "frame", "defect_type")}
    answers = [as_message(a) for a in grpo_train["answer"]]
    assert set(cols["gt_label"]) == {0, 1} and any(cols["solution_boxes"])
    for fn in (format_reward, localization_reward, defect_type_reward, consistency_reward):
        assert all(v in (None, 1.0) for v in fn(answers, **cols)), fn.__name__
    assert sum(verdict_reward(answers, **cols)) == pytest.approx(len(answers))


# ------------------------------------------------------------------------------------------ type


def test_defect_type_is_graded_and_only_for_anomalous_images():
    def answer(defect):
        return render_answer("anomalous", "anomalous", defect, TARGET, "r")

    got = defect_type_reward([answer("scratch"), answer("scuff"), answer("mark"), answer("hole"), NORMAL],
                             **columns(1, 5))
    assert got == [1.0, 0.85, 0.6, 0.0, 0.0]
    assert defect_type_reward([NORMAL, ANOMALOUS], **columns(0, 2)) == [None, None]
    assert defect_type_reward([ANOMALOUS], **columns(1, 1, defect=None)) == [None]


# ------------------------------------------------------------------------------------------ consistency


def test_consistency_asks_the_think_text_to_conclude_the_answer():
    contradicting = render_answer("No defect anywhere, so normal.", "anomalous", "scratch", TARGET, "r")
    silent = render_answer("I looked at it.", "normal")
    got = consistency_reward([ANOMALOUS, NORMAL, contradicting, silent, "<think>normal</think>", ""])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------- length, repetition


def test_length_is_a_soft_budget():
    got = length_reward(["x" * 100, "x" * 150, "x" * 200, "x" * 10_000], max_chars=100)
    assert got == [1.0, 0.5, 0.0, 0.0]


def test_repetition_penalises_loops_not_prose():
    loop = "<think>" + "the scratch is " * 200 + "</think>"
    prose, twice = repetition_reward([ANOMALOUS, ANOMALOUS + ANOMALOUS])
    assert prose == 1.0 and 0.6 < twice < 0.7  # about 0.5 / 0.8
    assert repetition_reward([loop])[0] < 0.05 and repetition_reward(["a b"]) == [1.0]


# ------------------------------------------------------------------------------------------ weights


def test_reward_functions_follow_the_config_weights():
    funcs, weights = reward_functions(RewardConfig(localization=0.0, verdict=2.0, max_chars=10))
    names = [getattr(f, "__name__", None) or f.func.__name__ for f in funcs]
    assert "localization_reward" not in names and weights[names.index("verdict_reward")] == 2.0
    assert len(funcs) == len(weights) == 6
    length = funcs[names.index("length_reward")]
    assert length(["x" * 20]) == [0.0]  # max_chars reaches the callable
    assert rewards.__doc__ and all(f.__doc__ or f.func.__doc__ for f in funcs)


def test_reward_report_sums_the_terms_as_grpo_does(grpo_train):
    cols = {k: grpo_train[k] for k in ("gt_label", "solution_boxes", "frame", "defect_type")}
    config = RewardConfig()
    report = rewards.reward_report(list(grpo_train["answer"]), config, **cols)
    share_normal = cols["gt_label"].count(0) / len(cols["gt_label"])
    weights = sum(w for _, w in rewards.reward_terms(config).values())
    # every term earns 1.0; the type term does not apply to normal images and counts 0 in their total
    assert report["reward"] == pytest.approx(weights - config.defect_type * share_normal)
    assert report["verdict"] == report["defect_type"] == 1.0 and report["n"] == len(grpo_train)
    assert report["verdict/accuracy"] == 1.0 and report["verdict/miss_rate"] == 0.0
    assert len(report["totals"]) == len(grpo_train)
    assert sum(report["totals"]) / len(grpo_train) == pytest.approx(report["reward"])
    worse = rewards.reward_report(["<think>hm</think>"] * len(grpo_train), config, **cols)
    assert worse["reward"] < report["reward"] and worse["verdict/miss_rate"] == 1.0
    gain = rewards.paired_gain(worse["totals"], report["totals"])
    assert gain["gain"] == pytest.approx(report["reward"] - worse["reward"])
    assert 0 < gain["low"] <= gain["gain"] <= gain["high"]


def test_paired_gain_tells_a_real_gain_from_noise():
    rng = __import__("numpy").random.default_rng(0)
    before = rng.normal(1.0, 0.5, 400)
    noise = rewards.paired_gain(before, before + rng.normal(0.0, 0.5, 400))
    assert noise["low"] < 0 < noise["high"]  # no gain: the interval straddles 0
    real = rewards.paired_gain(before, before + 0.2 + rng.normal(0.0, 0.5, 400))
    assert real["low"] > 0 and real["gain"] == pytest.approx(0.2, abs=0.06)
    assert rewards.paired_gain([1.0, 2.0], [1.5, 2.5]) == {"gain": 0.5, "low": 0.5, "high": 0.5, "n": 2}
    with pytest.raises(ValueError, match="equally long"):
        rewards.paired_gain([1.0, 2.0], [1.0])
