"""Exact values of the metrics at their edges: empty inputs, zero denominators, which answers are processed,
whitespace and punctuation rules, error messages. Values worked out by hand from each metric's definition."""

from __future__ import annotations

import pytest

from tokenreduce.eval import metrics as M


# ----- VQA --------------------------------------------------------------------------------------------
def test_punctuation_touching_a_space_is_deleted_everywhere():
    assert M.vqa_process_punctuation("a- b") == "a b"  # "- " touches a space: deleted
    assert M.vqa_process_punctuation("a -b") == "a b"  # " -" too
    assert M.vqa_process_punctuation("a-b") == "a b"  # touching none: a space instead
    assert M.vqa_process_punctuation("x-y -z") == "xy z"  # one touching occurrence deletes them all


def test_at_most_32_periods_are_stripped():
    # the official scorer passes re.UNICODE (32) as the count of periodStrip.sub
    assert M.vqa_process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("space", ["\n", "\t"])
def test_prediction_newlines_and_tabs_are_spaces_before_punctuation(space):
    # read as "x-y -z": " -" touches a space, so every "-" is deleted
    assert M.vqa_normalize(f"x-y{space}-z") == "xy z"


def test_official_ground_truth_processed_only_when_answers_disagree():
    # disagreeing answers get processPunctuation: "dog-house" -> "dog house", the prediction's normal form
    assert M.vqa_accuracy("dog house", ["dog-house"] * 5 + ["cat"] * 5) == 1.0
    # agreeing answers are used verbatim: "dog-house" never equals "dog house"
    assert M.vqa_accuracy("dog house", ["dog-house"] * 10) == 0.0


@pytest.mark.parametrize("space", ["\n", "\t"])
def test_lmms_ground_truth_whitespace_and_agreement(space):
    # lmms-eval replaces newlines and tabs in the answers by spaces, always
    assert M.vqa_accuracy("dog house", [f"dog{space}house"] * 10, gt_processing="lmms") == 1.0
    # agreeing answers are normalised too, as lmms-eval's vqav2_process_results does ("Two" -> "2")
    assert M.vqa_accuracy("two", ["Two"] * 10, gt_processing="lmms") == 1.0


def test_vqa_errors_are_exact():
    with pytest.raises(ValueError, match=r"^`answers` is empty: VQA accuracy needs the human answers of the question$"):
        M.vqa_accuracy("x", [])


# ----- GQA / ANLS / ChartQA -----------------------------------------------------------------------------
def test_gqa_normalize_lower_cases_and_drops_punctuation_only():
    # lmms-eval's GQA scorer keeps inner whitespace as it is
    assert M.gqa_normalize("  The   Cat! ") == "  the   cat "


def test_anls_normalizes_case_and_spaces_before_measuring():
    # "hello world" vs "hello word": one edit over the 13 characters of the answer as given (the official
    # scorer divides by the lengths before whitespace is collapsed)
    assert M.anls("Hello   World", ["hello word"]) == pytest.approx(1 - 1 / 13)
    # lower-casing (not upper-casing) is what compares: "ß" stays one letter, "SS" would be two
    assert M.anls("STRASSE", ["straße"]) == pytest.approx(1 - 2 / 7)


def test_anls_errors_are_exact():
    with pytest.raises(ValueError, match=r"^`answers` is empty: ANLS needs at least one accepted answer$"):
        M.anls("x", [])


def test_relaxed_percent_is_exactly_a_hundredth():
    assert M.relaxed_correctness("50%", "0.5", max_relative_change=0.001) == 1.0
    assert M.relaxed_correctness("5X%", "0.05") == 0.0  # only "%" is stripped: "5X" is text


# ----- POPE ---------------------------------------------------------------------------------------------
def test_pope_parse_splits_on_single_spaces_only():
    assert M.pope_parse("There is\tno cat") == "yes"  # "is\tno" is one word for the official script


def test_pope_metrics_exact_counts():
    predictions = ["yes", "yes", "no", "no", "no", "yes", "no"]
    answers = ["yes", "no", "no", "no", "yes", "yes", "yes"]
    # tp = 2 (0, 5), fp = 1 (1), tn = 2 (2, 3), fn = 2 (4, 6)
    out = M.pope_metrics(predictions, answers)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 1, 2, 2)
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 4)
    assert out["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert out["yes_ratio"] == pytest.approx(3 / 7)


def test_pope_metrics_equal_counts():
    # tp = fp = fn = 1: precision = recall = 1/2, f1 = 1/2
    out = M.pope_metrics(["yes", "yes", "no"], ["yes", "no", "yes"])
    assert (out["precision"], out["recall"], out["f1"]) == (0.5, 0.5, 0.5)


def test_pope_metrics_zero_denominators():
    empty = M.pope_metrics([], [])
    assert empty == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
                     "tp": 0, "fp": 0, "tn": 0, "fn": 0}
    # never "yes": no predicted positives; every gold "no": no actual positives
    assert M.pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0
    assert M.pope_metrics(["yes", "no"], ["no", "no"])["recall"] == 0.0
    wrong = M.pope_metrics(["yes", "no"], ["no", "yes"])
    assert (wrong["precision"], wrong["recall"], wrong["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"^2 predictions for 1 answers$"):
        M.pope_metrics(["yes", "no"], ["yes"])


# ----- MME ----------------------------------------------------------------------------------------------
def test_mme_parse_reads_only_the_first_four_characters():
    assert M.mme_parse("abcno") == "other"
    assert M.mme_parse("abno") == "no"


def test_mme_scores_exact():
    records = [
        {"category": "existence", "image": "a", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image": "a", "prediction": "maybe", "answer": "No"},
        {"category": "existence", "image": "b", "prediction": "No", "answer": "No"},
        {"category": "existence", "image": "b", "prediction": "Yes", "answer": "Yes"},
        {"category": "code_reasoning", "image": "c", "prediction": "No", "answer": "Yes"},
        {"category": "code_reasoning", "image": "c", "prediction": "No", "answer": "No"},
    ]
    out = M.mme_scores(records)
    assert out["categories"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4,
                                              "other_answers": 1}
    assert out["categories"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "questions": 2,
                                                   "other_answers": 0}
    assert (out["perception"], out["cognition"], out["total"]) == (125.0, 50.0, 175.0)


# ----- multiple choice ----------------------------------------------------------------------------------
def test_parse_choice_rules_exact():
    choices = ["cat", "dog running", "bird"]
    assert M.parse_choice("(B) the dog", choices) == M.ChoiceParse(1, "letter")
    assert M.parse_choice("B dog\nrunning", choices) == M.ChoiceParse(1, "letter+text")
    assert M.parse_choice("no idea", choices) == M.ChoiceParse(None, "unparsed")
    # option texts are compared lower-cased: "STRASSE" is not "straße"
    assert M.parse_choice("STRASSE", ["straße", "weg"]) == M.ChoiceParse(None, "unparsed")


def test_parse_choice_takes_all_26_letters():
    choices = [f"option {i}" for i in range(26)]
    assert M.parse_choice("Z", choices) == M.ChoiceParse(25, "letter")
    with pytest.raises(ValueError, match=r"^`choices` must hold 1 to 26 options, got 27$"):
        M.parse_choice("A", [*choices, "one more"])


def test_mean_over_groups_of_nothing():
    assert M.mean_over_groups([]) == {"overall": 0.0, "groups": {}, "counts": {}}


def test_pope_lmms_mode_on_no_samples_and_no_known_answer_is_zero():
    zeros = {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
             "tp": 0, "fp": 0, "tn": 0, "fn": 0}
    assert M.pope_metrics([], [], parsing="lmms") == zeros
    assert M.pope_metrics(["yes"], ["maybe"], parsing="lmms") == zeros


def test_parsing_mode_errors_are_exact():
    with pytest.raises(ValueError, match=r"^`parsing` must be one of \('official', 'lmms'\), got 'x'$"):
        M.pope_metrics(["yes"], ["yes"], parsing="x")
    with pytest.raises(ValueError, match=r"^`mode` must be one of \('official', 'lmms'\), got 'x'$"):
        M.mme_parse("yes", mode="x")
