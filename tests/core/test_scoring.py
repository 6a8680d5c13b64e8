"""scoring: the rules rewards and metrics share, on valid, edge and adversarial inputs."""

import pytest

from anomaly_assistant import scoring
from anomaly_assistant.finding import Box
from anomaly_assistant.grammar import ParsedAnswer, parse_answer, render_answer

# ------------------------------------------------------------------------------------ answers and verdicts


def test_verdict_words_one_list_for_grammar_and_replies():
    assert scoring.verdict_word("Defective.") == "anomalous" and scoring.verdict_word(" OK ") == "normal"
    assert scoring.verdict_word("ＮＧ") == "anomalous"  # full-width letters read as ASCII
    assert scoring.verdict_word("maybe") is None and scoring.verdict_word("") is None
    # the grammar's verdict field goes through the same words (and records that it had to)
    parsed = parse_answer('<think>t</think><answer>{"verdict": "defect-free", "defect_type": null, '
                          '"boxes": [], "rationale": ""}</answer>')
    assert parsed.verdict == "normal" and not parsed.ok
    assert all(scoring.verdict_word(w) == "anomalous" for w in scoring.ANOMALOUS_WORDS)
    assert all(scoring.verdict_word(w) == "normal" for w in scoring.NORMAL_WORDS)


def test_read_verdict_takes_the_first_whole_verdict_word():
    assert scoring.read_verdict("Yes, there is an anomaly.") == "anomalous"  # no "no" inside "anomaly"
    assert scoring.read_verdict("No anomaly here.") == "normal"
    assert scoring.read_verdict("The part is defect-free.") == "normal"  # the longer phrase beats "defect"
    assert scoring.read_verdict("It looks anomaly-free") is None  # a compound is not the word inside it
    assert scoring.read_verdict("ＹＥＳ。") == "anomalous"
    assert scoring.read_verdict("") is None and scoring.read_verdict("I cannot tell.") is None


def test_is_yes_is_the_visa_dr_rule_verbatim():
    assert scoring.is_yes("Yes.") and scoring.is_yes("I think YES, there is a crack")
    assert not scoring.is_yes("No.") and not scoring.is_yes("")
    assert scoring.is_yes("The eyes of the doll")  # a substring, as the protocol counts it


def test_verdict_correct_and_format_ok():
    assert scoring.verdict_correct("anomalous", 1) and scoring.verdict_correct("normal", 0)
    assert not scoring.verdict_correct("normal", 1) and not scoring.verdict_correct(None, 0)
    good = parse_answer(render_answer("a line", "anomalous", "scratch", [[1, 2, 30, 40]], "thin"))
    assert scoring.format_ok(good) and good.ok
    no_think = parse_answer('<answer>{"verdict": "normal", "defect_type": null, "boxes": [], "rationale": ""}'
                            "</answer>")
    assert no_think.verdict == "normal" and not scoring.format_ok(no_think)
    assert not scoring.format_ok(parse_answer("Yes, it is defective."))
    assert not scoring.format_ok(ParsedAnswer())  # nothing parsed is not a valid answer


# --------------------------------------------------------------------------------------- binary labels


def test_binary_metrics_hand_computed_and_macro_average():
    m = scoring.binary_metrics([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["false_alarm_rate"] == pytest.approx(1 / 2)
    assert scoring.binary_metrics([1, 1], [1, 0])["false_alarm_rate"] is None  # no normal part
    none = scoring.binary_metrics([1, 0], [0, 0])
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["accuracy"] == 0.5
    per, macro = scoring.per_class_binary(["a", "a", "b", "b"], [1, 0, 1, 0], [1, 0, 1, 1])
    assert per["a"]["accuracy"] == 1.0 and per["b"]["accuracy"] == 0.5
    assert macro["accuracy"] == pytest.approx(0.75)
    assert macro["precision"] == pytest.approx((1.0 + 0.5) / 2)
    assert macro["false_alarm_rate"] == pytest.approx((0.0 + 1.0) / 2)
    with pytest.raises(ValueError):
        scoring.binary_metrics([1, 0], [1])


def test_balanced_accuracy_weights_each_class_equally():
    # 4 anomalous, 3 right; 1 normal, wrong: (3/4 + 0/1) / 2 = 0.375, while plain accuracy is 3/5
    y, pred = [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]
    assert scoring.balanced_accuracy(y, [p == t for p, t in zip(pred, y)]) == pytest.approx(0.375)
    assert scoring.balanced_accuracy([1, 1], [True, False]) == 0.5  # one class present: its accuracy
    assert scoring.balanced_accuracy([], []) is None


# ----------------------------------------------------------------------------------------------- boxes


def test_iou_edge_cases():
    assert scoring.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert scoring.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == 50 / 150
    assert scoring.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share no pixel
    assert scoring.box_iou([0, 0, 10, 10], [2, 2, 4, 4]) == 4 / 100  # contained
    assert scoring.box_iou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0  # two empty boxes: no union, no overlap
    assert scoring.box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # an inverted box has no area
    assert Box(0, 0, 10, 10).iou(Box(5, 0, 15, 10)) == scoring.box_iou([0, 0, 10, 10], [5, 0, 15, 10])
    assert scoring.iou_matrix([], [[0, 0, 1, 1], [0, 0, 2, 2]]).shape == (0, 2)
    assert scoring.iou_matrix([[0, 0, 2, 2]], [[0, 0, 1, 1], [0, 0, 2, 2]]).tolist() == [[0.25, 1.0]]


# Two targets and two predictions on a line (height 1, so IoU is the 1-D interval IoU):
#   T0 = [0, 10], T1 = [6, 16], P0 = [2, 12], P1 = [0, 4]
#   IoU(P0, T0) = 8 / 12 = 0.667, IoU(P0, T1) = 6 / 14 = 0.429, IoU(P1, T0) = 4 / 10 = 0.4, IoU(P1, T1) = 0.
# Greedy takes the best pair P0-T0 first and leaves P1 with nothing; Hungarian pairs P0-T1 and P1-T0.
TARGETS = [[0, 0, 10, 1], [6, 0, 16, 1]]
PREDICTED = [[2, 0, 12, 1], [0, 0, 4, 1]]


def test_greedy_and_hungarian_matching_differ_on_a_crafted_case():
    assert scoring.match_boxes(PREDICTED, TARGETS, 0.3, "greedy") == [(0, 0, pytest.approx(8 / 12))]
    assert scoring.match_boxes(PREDICTED, TARGETS, 0.3, "hungarian") == [
        (0, 1, pytest.approx(6 / 14)), (1, 0, pytest.approx(0.4))]
    assert scoring.match_boxes(PREDICTED, TARGETS, 0.5, "hungarian") == [(0, 0, pytest.approx(8 / 12))]
    assert scoring.match_boxes(PREDICTED, [], 0.0) == [] and scoring.match_boxes([], TARGETS) == []
    assert scoring.match_boxes([[0, 0, 1, 1]], [[5, 5, 6, 6]], 0.0) == []  # no overlap is never a match
    with pytest.raises(ValueError):
        scoring.match_boxes(PREDICTED, TARGETS, method="nearest")


def test_box_scores_precision_recall_f1_and_mean_iou():
    greedy = scoring.box_scores(PREDICTED, TARGETS, 0.3, "greedy")
    assert (greedy.precision, greedy.recall, greedy.f1) == (0.5, 0.5, 0.5)
    assert greedy.mean_iou == pytest.approx(8 / 12)
    best = scoring.box_scores(PREDICTED, TARGETS, 0.3)
    assert (best.precision, best.recall, best.f1) == (1.0, 1.0, 1.0)
    assert best.mean_iou == pytest.approx((6 / 14 + 0.4) / 2)
    # one of three predictions hits one of two targets: P = 1/3, R = 1/2, F1 = 2PR / (P + R) = 0.4
    three = scoring.box_scores([[0, 0, 10, 1], [20, 0, 30, 1], [40, 0, 50, 1]], TARGETS, 0.5)
    assert (three.precision, three.recall) == (pytest.approx(1 / 3), 0.5) and three.f1 == pytest.approx(0.4)
    empty = scoring.box_scores([], [])  # a normal image answered without boxes
    assert (empty.precision, empty.recall, empty.f1, empty.mean_iou) == (1.0, 1.0, 1.0, None)
    missed = scoring.box_scores([], TARGETS)
    assert (missed.precision, missed.recall, missed.f1) == (0.0, 0.0, 0.0)
    invented = scoring.box_scores(PREDICTED, [])
    assert (invented.precision, invented.recall, invented.f1) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------- defect types


def test_taxonomy_and_graded_type_similarity():
    assert scoring.canonical_defect("Broken_Large ") == "broken large"
    assert scoring.canonical_defect(" ") is None
    assert scoring.defect_family("broken_large") == "missing" and scoring.defect_family("blowhole") == "hole"
    assert scoring.defect_family("chunk of wax missing") == "missing"
    assert scoring.defect_family("mousebite") == "missing"
    assert scoring.defect_family("short") == "foreign_object"
    assert scoring.defect_family("xyz") == scoring.OTHER_FAMILY and scoring.defect_family(None) == "other"
    assert scoring.type_similarity("broken_large", "Broken large") == 1.0
    assert scoring.type_similarity("pit", "hole") == 0.85  # synonyms
    assert scoring.type_similarity("fold", "bent") == 0.6  # same family, not synonyms
    assert scoring.type_similarity("scratch", "hole") == 0.0
    assert scoring.type_similarity("xyz", "qqq") == 0.0  # two unknown names share no family
    assert scoring.type_similarity(None, None) == 1.0 and scoring.type_similarity("scratch", None) == 0.0


# ------------------------------------------------------------------------------- multiple-choice replies

YES_NO = {"A": "Yes.", "B": "No."}
TYPES = {"A": "Crack", "B": "Scratch"}
REVERSED = {"A": "Scratch", "B": "Crack"}
XYZ = {"A": "x", "B": "y", "C": "z"}


@pytest.mark.parametrize(("reply", "options", "letter", "read_by"), [
    ("A", YES_NO, "A", "letter"),
    ("Answer: B.", YES_NO, "B", "letter"),
    ("(A) Yes", YES_NO, "A", "letter"),
    ("(B)", YES_NO, "B", "letter"),
    ("b", YES_NO, "B", "letter"),  # a lone lowercase letter is still the letter
    ("(b).", YES_NO, "B", "letter"),
    ("Ｂ", YES_NO, "B", "letter"),  # full-width
    ("答案：B", YES_NO, "B", "letter"),  # MMAD's \b would not see B after a CJK character
    ("The answer is (C) because", XYZ, "C", "letter"),
    ("I pick C here", XYZ, "C", "letter"),
    ("B. Crack is visible, not A", TYPES, "B", "letter"),  # the first letter, as LLaVA's query script takes
    ("A is correct.", XYZ, "A", "letter"),  # an "A" no option text explains is the letter after all
    ("A scratch is visible.", TYPES, "B", "option text"),  # "A" the article
    ("Yes, there is an anomaly.", YES_NO, "A", "option text"),  # not "No" from inside "anomaly"
    ("There is no defect.", YES_NO, "B", "option text"),  # difflib alone would pick "Yes."
    ("yes", YES_NO, "A", "option text"),
    ("It is Crack", REVERSED, "B", "option text"),
    ("crack", TYPES, "A", "option text"),
    ("Both are possible", REVERSED, "B", "closest option text"),  # MMAD's fallback always names an option
    ("é", YES_NO, "A", "closest option text"),
    ("", YES_NO, None, "nothing"),
    ("  \n ", YES_NO, None, "nothing"),
    ("A", {}, None, "nothing"),
])
def test_read_choice(reply, options, letter, read_by):
    assert tuple(scoring.read_choice(reply, options)) == (letter, read_by)


def test_read_choice_falls_back_to_difflib_like_mmad():
    """Replies with no letter and no whole option text get MMAD's own fallback, difflib's closest option."""
    import difflib

    options = {"A": "Scratch on the right", "B": "Crack on the left", "C": "No defect"}
    for reply in ("cracked, left side", "scratches at the right", "nothing wrong", "perfect", "?"):
        closest = difflib.get_close_matches(reply, list(options.values()), n=1, cutoff=0.0)[0]
        want = next(k for k, v in options.items() if v == closest)
        assert tuple(scoring.read_choice(reply, options)) == (want, "closest option text"), reply


# ------------------------------------------------------------- reasoning text and layout (GRPO rewards)


@pytest.mark.parametrize("think, verdict", [
    ("I see no scratch, crack, hole, stain or missing part, so it is normal.", "normal"),  # data wording
    ("Scanning the bottle: at the top the surface is broken by a dark line. Verdict: anomalous, scratch.",
     "anomalous"),
    ("There is no visible defect.", "normal"),
    ("This isn't defective.", "normal"),
    ("This isn’t defective.", "normal"),
    ("It is not normal.", "anomalous"),
    ("At first it looks normal, but a crack runs across it: defective.", "anomalous"),  # the last word counts
    ("The part is defect-free", "normal"),
    ("I cannot tell.", None),
    ("", None),
])
def test_concluded_verdict(think, verdict):
    assert scoring.concluded_verdict(think) == verdict


def test_concluded_verdict_is_linear_on_long_text():
    import time

    start = time.perf_counter()
    assert scoring.concluded_verdict("normal anomalous " * 20_000 + "no defect") == "normal"
    assert time.perf_counter() - start < 1.0


def test_exact_layout_rejects_what_the_parser_tolerates():
    answer = render_answer("a dark line, anomalous", "anomalous", "scratch", [[1, 2, 30, 40]], "r")
    assert scoring.exact_layout(answer) and scoring.exact_layout(f"\n {answer}\n")
    glued = answer.replace("</think>\n", "</think>x")
    tolerated = (answer + answer, "Sure! " + answer, answer + " done", glued)
    broken = (answer.replace("</answer>", ""), answer[answer.index("<answer>"):], "")
    assert all(parse_answer(t).ok for t in tolerated) and not any(parse_answer(t).ok for t in broken)
    assert not any(scoring.exact_layout(t) for t in tolerated + broken)
