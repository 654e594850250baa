"""Official metrics on hand-checked cases, including the official scorers' edge cases."""

from __future__ import annotations

import pytest

from tokenreduce.eval import metrics as M

# ----- VQA accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),                 # number word -> digit, lower case
        ("none", "0"),
        ("a dog", "dog"),             # article dropped
        ("The Cat.", "cat"),          # period not before a digit is stripped
        ("3.5", "3.5"),               # period before a digit kept
        ("10,000", "10000"),          # digit,digit: punctuation removed, not spaced
        ("yes!", "yes"),              # "!" touching no space -> replaced by a space, then split away
        ("t-shirt", "t shirt"),       # "-" inside a word -> space
        ("left - right", "left right"),  # "-" touching a space -> removed
        ("dont", "don't"),            # contraction table
        ("  Red\tcar\n", "red car"),  # tabs / newlines -> spaces, stripped
    ],
)
def test_vqa_normalization(raw, normalized):
    assert M.vqa_normalize(raw) == normalized


def test_vqa_ten_choose_nine_averaging():
    # 3 of 10 humans said "yes": leaving out a "yes" leaves 2 matches (2/3), leaving out another answer 3 (1).
    answers = ["yes"] * 3 + ["no"] * 7
    assert M.vqa_accuracy("yes", answers) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)  # 0.9
    answers = ["yes"] * 2 + ["no"] * 8
    assert M.vqa_accuracy("Yes", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert M.vqa_accuracy("no", answers) == 1.0
    assert M.vqa_accuracy("maybe", answers) == 0.0


def test_vqa_numbers_and_articles_in_prediction():
    answers = ["2"] * 10
    assert M.vqa_accuracy("two", answers) == 1.0
    assert M.vqa_accuracy("The 2.", answers) == 1.0
    assert M.vqa_accuracy("2 dogs", answers) == 0.0


def test_vqa_ground_truth_processing_official_vs_lmms():
    # Official: ground truth only gets processPunctuation (and only when answers disagree); the annotation
    # files are pre-normalised, so un-normalised number words in the ground truth never match a digit.
    answers = ["two"] * 4 + ["three"] * 6
    assert M.vqa_accuracy("two", answers) == 0.0
    # lmms-eval also maps number words to digits in the ground truth when the answers disagree.
    assert M.vqa_accuracy("two", answers, gt_processing="lmms") == pytest.approx(1.0)
    # Agreeing answers are used verbatim by both.
    assert M.vqa_accuracy("dog", ["dog!"] * 10) == 0.0
    # Disagreeing answers get processPunctuation only: "dog!" -> "dog " and the official scorer never strips
    # the ground truth afterwards, so the trailing space stays and "dog" does not match.
    assert M.vqa_accuracy("dog", ["dog!"] * 5 + ["cat"] * 5) == 0.0
    assert M.vqa_accuracy("dog", ["dog,"] * 5 + ["cat"] * 5) == 0.0
    assert M.vqa_accuracy("dog", ["(dog)"] * 5 + ["cat"] * 5) == 0.0
    assert M.vqa_accuracy("dog", ["dog"] * 5 + ["cat"] * 5) == 1.0
    with pytest.raises(ValueError, match="gt_processing"):
        M.vqa_accuracy("x", ["x"], gt_processing="other")
    with pytest.raises(ValueError, match="answers"):
        M.vqa_accuracy("x", [])


def test_vqa_period_strip_keeps_the_official_typo():
    # "(?!<=\d)" is a lookahead: a period AFTER a digit but not before one is still removed.
    assert M.vqa_process_punctuation("2.") == "2"
    assert M.vqa_process_punctuation("v1.2") == "v1.2"


# ----- GQA ------------------------------------------------------------------------------------------


def test_gqa_exact_match():
    assert M.gqa_exact_match("Yes.", "yes") == 1.0
    assert M.gqa_exact_match("The table", "the table") == 1.0
    assert M.gqa_exact_match(" the  table ", "the table") == 0.0  # whitespace counts, as in lmms-eval
    assert M.gqa_exact_match("the table", "table") == 0.0  # no article removal in GQA
    assert M.gqa_exact_match("left", "right") == 0.0


# ----- ANLS -----------------------------------------------------------------------------------------


def test_anls_values_and_threshold():
    assert M.anls("abcf", ["abcd"]) == pytest.approx(0.75)  # 1 edit over 4
    assert M.anls(" Hello   World ", ["hello world"]) == 1.0  # case and spacing ignored
    assert M.anls("ax", ["ab"]) == 0.5  # NL = 0.5 exactly: the official scorer keeps it
    assert M.anls("axx", ["abc"]) == 0.0  # NL 0.67 > 0.5
    assert M.anls("abx", ["abc"]) == pytest.approx(1 - 1 / 3)  # NL 0.33 < 0.5 kept
    assert M.anls("abcd", ["wxyz", "abce"]) == pytest.approx(0.75)  # best of the answers
    assert M.anls("", [""]) == 1.0
    assert M.anls("", ["abc"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        M.anls("x", [])


# ----- ChartQA ----------------------------------------------------------------------------------------


def test_chartqa_relaxed_accuracy():
    assert M.relaxed_correctness("46", "45") == 1.0      # 2.2% off
    assert M.relaxed_correctness("47.25", "45") == 1.0   # exactly 5%
    assert M.relaxed_correctness("48", "45") == 0.0      # 6.7% off
    assert M.relaxed_correctness("-10.4", "-10") == 1.0
    assert M.relaxed_correctness("0.46", "45%") == 1.0   # 45% -> 0.45
    assert M.relaxed_correctness("45%", "45") == 0.0     # 0.45 vs 45: percentages are fractions
    assert M.relaxed_correctness("0", "0") == 1.0        # zero target: exact string match
    assert M.relaxed_correctness("0.0", "0") == 0.0
    assert M.relaxed_correctness("0.01", "0") == 0.0
    assert M.relaxed_correctness("Yes", "yes") == 1.0
    assert M.relaxed_correctness(" Yes ", "yes") == 0.0  # whitespace counts (the runner strips outputs)
    assert M.relaxed_correctness("1,000", "1000") == 0.0  # not a float: string compare


# ----- POPE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("There is not a cat.", "no"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes. No other animal is visible", "yes"),  # only the first sentence counts
        ("NO", "yes"),                               # the official word list is No / not / no
        ("Nope", "yes"),
        ("I do not think so", "no"),
        ("No, there isn't.", "no"),
    ],
)
def test_pope_parse(text, label):
    assert M.pope_parse(text) == label


def test_pope_metrics_use_predicted_yes_ratio():
    preds = ["Yes", "yes", "Yes, there is", "No"]
    gold = ["yes", "no", "no", "no"]
    m = M.pope_metrics(preds, gold)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 2, 1, 0)
    assert m["accuracy"] == 0.5
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == 1.0
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == 0.75  # predicted, not ground truth (which would be 0.25)


# ----- MME ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [("Yes", "yes"), ("no", "no"), ("yes.", "yes"), ("No, it is not.", "no"), ("There is no dog", "other"),
     ("Not sure", "no"), ("", "other")],
)
def test_mme_parse(text, label):
    assert M.mme_parse(text) == label


def test_mme_scores_acc_plus_and_sums():
    records = [
        # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50
        {"category": "existence", "image": "e1", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image": "e1", "prediction": "No", "answer": "No"},
        {"category": "existence", "image": "e2", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image": "e2", "prediction": "Yes", "answer": "No"},
        # OCR: one image, both right -> 200
        {"category": "OCR", "image": "o1", "prediction": "yes", "answer": "Yes"},
        {"category": "OCR", "image": "o1", "prediction": "no", "answer": "No"},
        # code_reasoning (cognition): both wrong, one unparseable
        {"category": "code_reasoning", "image": "c1", "prediction": "maybe", "answer": "Yes"},
        {"category": "code_reasoning", "image": "c1", "prediction": "yes", "answer": "No"},
    ]
    s = M.mme_scores(records)
    assert s["categories"]["existence"]["acc"] == 75.0
    assert s["categories"]["existence"]["acc_plus"] == 50.0
    assert s["categories"]["existence"]["score"] == 125.0
    assert s["categories"]["OCR"]["score"] == 200.0
    assert s["categories"]["code_reasoning"]["score"] == 0.0
    assert s["categories"]["code_reasoning"]["other_answers"] == 1
    assert s["perception"] == 325.0
    assert s["cognition"] == 0.0
    assert s["total"] == 325.0
    assert "celebrity" in s["missing_categories"]
    assert len(M.MME_PERCEPTION) == 10 and len(M.MME_COGNITION) == 4


# ----- Multiple choice ------------------------------------------------------------------------------

CHOICES = ("a cat", "a dog", "a bird", "a fish", "a horse")


@pytest.mark.parametrize(
    ("text", "index", "rule"),
    [
        ("B", 1, "letter"),
        ("(C)", 2, "letter"),
        ("C. a bird", 2, "letter"),
        ("D) a fish", 3, "letter"),
        ("E: a horse", 4, "letter"),
        ("B a dog", 1, "letter+text"),
        ("The answer is (D).", 3, "answer-is"),
        ("Answer: A", 0, "answer-is"),
        ("a dog", 1, "text"),                       # MC answer given as text
        ("A dog.", 1, "text"),                      # "A" is an article here, not option A
        ("I think it is a horse running", 4, "text-in-answer"),
        ("It shows (B) clearly", 1, "parenthesised"),
    ],
)
def test_parse_choice(text, index, rule):
    parsed = M.parse_choice(text, CHOICES)
    assert (parsed.index, parsed.rule) == (index, rule)


@pytest.mark.parametrize("text", ["I don't know", "a cat or a dog", "F", "", "The answer is a mammal"])
def test_parse_choice_never_guesses(text):
    parsed = M.parse_choice(text, CHOICES)
    assert parsed.index is None and parsed.letter is None
    score, _ = M.choice_correct(text, CHOICES, 0)
    assert score == 0.0


def test_choice_correct_and_errors():
    assert M.choice_correct("B", CHOICES, 1)[0] == 1.0
    assert M.choice_correct("B", CHOICES, 2)[0] == 0.0
    with pytest.raises(ValueError, match="answer_index"):
        M.choice_correct("B", CHOICES, 5)
    with pytest.raises(ValueError, match="choices"):
        M.parse_choice("A", [])


def test_mean_over_groups_is_unweighted():
    out = M.mean_over_groups([("a", 1), ("a", 0), ("b", 1)])
    assert out["groups"] == {"a": 0.5, "b": 1.0}
    assert out["overall"] == 0.75  # mean of subtask means, not 2/3 over samples
    assert out["counts"] == {"a": 2, "b": 1}
