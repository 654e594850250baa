"""Every metric with an lmms-eval counterpart equals lmms-eval's own function on generated cases.

The reference functions are lmms-eval 0.7.3's, read from its installed source (see
``tests/eval_runner/lmms_reference.py``). Cases come from a seeded generator drawing from pools of the
strings these scorers treat specially (number words, articles, contractions, punctuation next to
spaces or digits, periods, case, surrounding whitespace, characters whose upper case is longer).
Deliberate differences (multiple-choice parsing) are asserted as such and listed in docs/metrics.md.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.eval_runner.lmms_reference import lmms_functions
from tokenreduce.eval import metrics as M

N_CASES = 400

VQA_POOL = [
    "two", "2", "Two", "2.", "two!", "the dog", "dog", "a dog", "dogs", "yes", "Yes!", "no.", "no", "10,000",
    "10000", "1,,2", "12", "don't", "dont", "Dont", "it's", "its", "man's hat", "3.5", "3.5.", " red ", "red\n",
    "Red?", "red", "one,two", "(left)", "left", "none", "zero", "0", "x-ray", "x ray", "on the table",
    "what's up", "Whats up", "blue / white", "blue white", "it is, yes", "a", "the",
]


def _rng(name: str) -> random.Random:
    return random.Random(f"lmms-parity-{name}")


@pytest.fixture(scope="module")
def evalai():
    return lmms_functions("tasks/_task_utils/vqa_eval_metric.py", "EvalAIAnswerProcessor")["EvalAIAnswerProcessor"]


def _ten_answers(rng: random.Random) -> list[str]:
    kinds = rng.sample(VQA_POOL, rng.randint(1, 4))
    return [rng.choice(kinds) for _ in range(10)]


def test_vqav2_lmms_mode_equals_vqav2_process_results(evalai):
    reference = lmms_functions("tasks/vqav2/utils.py", "vqav2_process_results",
                               EvalAIAnswerProcessor=evalai)["vqav2_process_results"]
    rng = _rng("vqav2")
    cases = [("2", ["two"] * 10), ("Two", ["2"] * 10), ("dog", ["the dog"] * 10)]
    cases += [(rng.choice(VQA_POOL), _ten_answers(rng)) for _ in range(N_CASES)]
    for prediction, answers in cases:
        doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]}
        expected = reference(doc, [prediction])["exact_match"]
        got = M.vqa_accuracy(prediction, answers, gt_processing="lmms")
        assert got == pytest.approx(expected, abs=1e-12), (prediction, answers)
    assert M.vqa_accuracy("2", ["two"] * 10, gt_processing="lmms") == 1.0


def test_textvqa_lmms_mode_equals_textvqa_process_results(evalai):
    reference = lmms_functions("tasks/textvqa/utils.py", "textvqa_process_results",
                               EvalAIAnswerProcessor=evalai)["textvqa_process_results"]
    rng = _rng("textvqa")
    # TextVQA's own tokenisation first (",", "?" dropped, "'s" split): where it and VQAv2's scorer differ
    cases = [("the dog's bowl", ["the dog 's bowl"] * 10), ("Yes?", ["yes"] * 10), ("1,000", ["1000"] * 10),
             ("Dog's", ["dog's"] * 10)]
    cases += [(rng.choice(VQA_POOL), _ten_answers(rng)) for _ in range(N_CASES)]
    assert any(M.vqa_accuracy(p, a, "lmms_textvqa") != M.vqa_accuracy(p, a, "lmms") for p, a in cases[:4])
    for prediction, answers in cases:
        expected = reference({"question_id": 1, "answers": list(answers)}, [prediction])["exact_match"]
        got = M.vqa_accuracy(prediction, answers, gt_processing="lmms_textvqa")
        assert got == pytest.approx(expected, abs=1e-12), (prediction, answers)


def test_vqa_official_mode_on_the_documented_examples():
    """The processing steps and the 10-choose-9 average as visualqa.org/evaluation describes them."""
    assert M.vqa_normalize("Dont") == "don't"          # apostrophe added to a contraction
    assert M.vqa_normalize("two") == "2"               # number words to digits
    assert M.vqa_normalize("the dog") == "dog"         # articles removed
    assert M.vqa_normalize("100,978") == "100978"      # no space for a comma between digits
    assert M.vqa_normalize("2:50 pm") == "2:50 pm"     # colons kept (times)
    assert M.vqa_normalize("girl's") == "girl's"       # apostrophes kept (possessives)
    assert M.vqa_normalize("3.5") == "3.5" and M.vqa_normalize("yes.") == "yes"  # decimal points only
    assert M.vqa_normalize("black/white") == "black white"  # other punctuation becomes a space
    # "an answer is 100% accurate if at least 3 humans gave it", averaged over the 10 sets of 9 humans
    assert M.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert M.vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert M.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    # the official scorer leaves agreeing answers untouched: "2" does not match ten "two"
    assert M.vqa_accuracy("2", ["two"] * 10) == 0.0


def _random_text(rng: random.Random, alphabet: str = "abcdeAB ß.-") -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))


def test_anls_equals_lmms_anls():
    ref = lmms_functions("api/metrics.py", "anls", "levenshtein_distance")["anls"]
    rng = _rng("anls")
    cases = [("  abd  ", ["abc"]), ("ax", ["ab"]), ("", [""]), ("", ["abc"]), ("Straße", ["STRASSE"])]
    for _ in range(N_CASES):
        pred = _random_text(rng)
        answers = [pred.upper()[:4] + _random_text(rng, "ab ") if rng.random() < 0.3 else _random_text(rng)
                   for _ in range(rng.randint(1, 3))]
        cases.append((pred, answers))
    for pred, answers in cases:
        assert M.anls(pred, answers) == ref(answers, [pred])["anls"], (pred, answers)
    assert M.anls("  abd  ", ["abc"]) == pytest.approx(1 - 1 / 7)  # 0.857


# Text from the whole of Unicode except NUL (numpy's fixed-width strings, which lmms-eval's exact_match
# compares, drop trailing NULs), weighted towards the characters the scorers treat specially.
TEXT = st.text(st.one_of(st.sampled_from(list("aAbB ß.,?!'-/:%0123456789\n\t")),
                         st.characters(blacklist_characters="\x00")), max_size=12)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True)


@FUZZ
@given(prediction=TEXT, answers=st.lists(TEXT, min_size=1, max_size=3))
def test_anls_equals_lmms_anls_on_any_text(prediction, answers):
    ref = lmms_functions("api/metrics.py", "anls", "levenshtein_distance")["anls"]
    assert M.anls(prediction, answers) == ref(answers, [prediction])["anls"]


@FUZZ
@given(prediction=TEXT, target=TEXT)
def test_relaxed_correctness_and_gqa_equal_lmms_on_any_text(prediction, target):
    relaxed = lmms_functions("tasks/chartqa/utils.py", "relaxed_correctness")["relaxed_correctness"]
    exact = lmms_functions("api/metrics.py", "exact_match_hf_evaluate")["exact_match_hf_evaluate"]
    assert M.relaxed_correctness(prediction, target) == float(relaxed(prediction, target))
    expected = exact(predictions=[prediction], references=[target], ignore_case=True, ignore_punctuation=True)
    assert M.gqa_exact_match(prediction, target) == float(expected["exact_match"])


@FUZZ
@given(prediction=TEXT, answers=st.lists(TEXT, min_size=10, max_size=10))
def test_vqa_lmms_modes_equal_lmms_on_any_text(prediction, answers):
    evalai = lmms_functions("tasks/_task_utils/vqa_eval_metric.py", "EvalAIAnswerProcessor")["EvalAIAnswerProcessor"]
    vqav2 = lmms_functions("tasks/vqav2/utils.py", "vqav2_process_results", EvalAIAnswerProcessor=evalai)
    textvqa = lmms_functions("tasks/textvqa/utils.py", "textvqa_process_results", EvalAIAnswerProcessor=evalai)
    doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]}
    expected = vqav2["vqav2_process_results"](doc, [prediction])["exact_match"]
    assert M.vqa_accuracy(prediction, answers, "lmms") == pytest.approx(expected, abs=1e-12)
    expected = textvqa["textvqa_process_results"]({"question_id": 1, "answers": list(answers)}, [prediction])
    assert M.vqa_accuracy(prediction, answers, "lmms_textvqa") == pytest.approx(expected["exact_match"], abs=1e-12)


def test_relaxed_correctness_equals_lmms_chartqa():
    ref = lmms_functions("tasks/chartqa/utils.py", "relaxed_correctness")["relaxed_correctness"]
    rng = _rng("chartqa")
    numbers = ["0", "0.0", "45", "45%", "47.25", "48", "-10", "-10.4", "1e3", "1000", "12.5%", "0.125", "nan"]
    words = ["Yes", "yes", " yes", "No", "Tokyo", "tokyo ", ""]
    for _ in range(N_CASES):
        pred, target = rng.choice(numbers + words), rng.choice(numbers + words)
        if rng.random() < 0.3:
            pred = f"{float(rng.choice(numbers[:11]).rstrip('%')) * rng.uniform(0.9, 1.1):.3f}"
        assert M.relaxed_correctness(pred, target) == float(ref(pred, target)), (pred, target)


def test_gqa_exact_match_equals_lmms_exact_match():
    ref = lmms_functions("api/metrics.py", "exact_match_hf_evaluate")["exact_match_hf_evaluate"]
    rng = _rng("gqa")
    pool = ["yes", "Yes.", " yes", "yes ", "the table", "the  table", "table", "left", "Left!", "t-shirt",
            "tshirt", "man's", "mans", "white/black", "whiteblack", ""]
    for _ in range(N_CASES):
        pred, answer = rng.choice(pool), rng.choice(pool)
        expected = ref(predictions=[pred], references=[answer], ignore_case=True, ignore_punctuation=True)
        assert M.gqa_exact_match(pred, answer) == float(expected["exact_match"]), (pred, answer)


POPE_POOL = ["yes", "no", "Yes", "No", " yes", "no.", "Yes, there is a dog.", "No, there is not.",
             "There is no dog.", "maybe", "", "NO", "not sure", "yes."]


def test_pope_lmms_parsing_equals_lmms_pope():
    names = ("pope_process_results", "pope_aggregate_accuracy", "pope_aggregate_precision",
             "pope_aggregate_recall", "pope_aggregate_f1_score", "pope_aggregate_yes_ratio")
    ref = lmms_functions("tasks/pope/utils.py", *names)
    rng = _rng("pope")
    for trial in range(40):
        n = rng.randint(1, 30)
        preds = [rng.choice(POPE_POOL) for _ in range(n)]
        answers = [rng.choice(["yes", "no"]) for _ in range(n)]
        rows = [ref["pope_process_results"]({"question_id": i, "answer": a}, [p])["pope_accuracy"]
                for i, (p, a) in enumerate(zip(preds, answers))]
        ours = M.pope_metrics(preds, answers, parsing="lmms")
        pairs = [(row["prediction"], row["ground_truth"]) for row in rows]
        for key, (p, g) in {"tp": ("yes", "yes"), "fp": ("yes", "no"), "tn": ("no", "no"), "fn": ("no", "yes")}.items():
            assert ours[key] == sum(pair == (p, g) for pair in pairs), (trial, key)
        for key, fn in [("accuracy", "pope_aggregate_accuracy"), ("precision", "pope_aggregate_precision"),
                        ("recall", "pope_aggregate_recall"), ("f1", "pope_aggregate_f1_score"),
                        ("yes_ratio", "pope_aggregate_yes_ratio")]:
            assert ours[key] == pytest.approx(ref[fn](rows), abs=1e-12), (trial, key, preds, answers)


def test_mme_lmms_parsing_equals_lmms_mme():
    ref = lmms_functions("tasks/mme/utils.py", "parse_pred_ans", "mme_process_results", "mme_aggregate_results",
                         "eval_type_dict")
    rng = _rng("mme")
    pool = ["Yes", "No", "yes.", "n", "Y", "y.", "x", "", "No, it is not.", "Yes, it is.", "...no", "The answer is yes",
            "nope", "yes!", "Not at all", "y.e.s", " NO "]
    for text in pool:
        assert M.mme_parse(text, mode="lmms") == ref["parse_pred_ans"](text), text
    for _ in range(30):
        categories = rng.sample(M.MME_PERCEPTION + M.MME_COGNITION, rng.randint(1, 6))
        records, results = [], {"mme_perception_score": [], "mme_cognition_score": []}
        for cat in categories:
            for image in range(rng.randint(1, 5)):
                for answer in rng.sample(["Yes", "No"], 2):
                    prediction = rng.choice(pool)
                    doc = {"question_id": f"{cat}/{image}.png", "category": cat, "answer": answer}
                    for key, value in ref["mme_process_results"](doc, [prediction]).items():
                        results[key].append(value)
                    records.append({"category": cat, "image": f"{image}.png", "prediction": prediction,
                                    "answer": answer})
        ours = M.mme_scores(records, parsing="lmms")
        for key, ours_key in [("mme_perception_score", "perception"), ("mme_cognition_score", "cognition")]:
            expected = ref["mme_aggregate_results"](results[key]) if results[key] else 0.0
            assert ours[ours_key] == pytest.approx(expected, abs=1e-9), (key, records)


def test_mme_official_parsing():
    """MME's calculation.py: exact yes/no, else yes/no within the first four characters, else other."""
    assert [M.mme_parse(t) for t in ["yes", "No", "Yes, it is", "no.", "n", "It is yes", "Not"]] == [
        "yes", "no", "yes", "no", "other", "other", "no"]


# ----- multiple choice: equal where lmms-eval's parser decides, different by design where it guesses ---------

LETTER_FORMS = ["{L}", "({L})", "{L}.", "{L}:", "{L}. {t}", "({L}) {t}", "The answer is {L}.",
                "The answer is ({L}).", "Answer: {L}", "Best option: ({L})", "{L} {t}"]
WORDS = ["dog", "cat", "runs", "away", "jumps", "over", "table", "man", "woman", "red", "blue", "car", "opens", "door", "sits", "down"]


def _mc_cases(name: str):
    rng = _rng(name)
    for k in range(N_CASES):
        options = rng.sample([" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(20)], 5)
        if len(set(options)) < 5:
            continue
        answer, said = rng.randrange(5), rng.randrange(5)
        form = LETTER_FORMS[k % len(LETTER_FORMS)]
        yield options, answer, form.format(L="ABCDE"[said], t=options[said])


def test_multiple_choice_equals_lmms_nextqa_parser_on_letter_answers():
    parse = lmms_functions("tasks/nextqa/utils.py", "parse_multi_choice_response")["parse_multi_choice_response"]
    for options, answer, response in _mc_cases("nextqa"):
        expected = parse(response, list("ABCDE"), dict(zip("ABCDE", options))) == "ABCDE"[answer]
        assert M.choice_correct(response, options, answer)[0] == float(expected), (response, options)


def test_multiple_choice_equals_lmms_mvbench_scorer_on_letter_answers():
    mcq_acc = lmms_functions("tasks/mvbench/utils.py", "mcq_acc")["mcq_acc"]
    for options, answer, response in _mc_cases("mvbench"):
        for text in (response, response.lower() if len(response) == 1 else response):
            assert M.choice_correct(text, options, answer)[0] == float(mcq_acc("ABCDE"[answer], text)), text


def test_multiple_choice_differs_from_lmms_only_where_documented():
    parse = lmms_functions("tasks/nextqa/utils.py", "parse_multi_choice_response")["parse_multi_choice_response"]
    mcq_acc = lmms_functions("tasks/mvbench/utils.py", "mcq_acc")["mcq_acc"]
    options = ["dog", "cat", "red car", "blue door", "man"]
    index2ans = dict(zip("ABCDE", options))
    # 1. nothing the lmms-eval NExT-QA parser recognises: it picks a random option; we record a parse failure
    #    or read the option text
    picks = set()
    for seed in range(40):
        random.seed(seed)
        picks.add(parse("red car", list("ABCDE"), index2ans))
    assert len(picks) > 1
    assert M.parse_choice("red car", options).index == 2
    assert M.parse_choice("no idea", options).index is None
    # 2. "B)" alone: lmms-eval's NExT-QA parser guesses; we read B
    assert M.parse_choice("B)", options).index == 1
    # 3. the option text as the answer: lmms-eval's MVBench scorer compares it with the letter (wrong)
    assert mcq_acc("C", "red car") == 0 and M.choice_correct("red car", options, 2)[0] == 1.0
    # 4. lmms-eval's NExT-QA parser matches option text as a substring and keeps the last one found
    #    ("man" inside "woman"); we match whole words and need a single option
    long = "I think that the red car is the one next to the woman"
    assert parse(long, list("ABCDE"), index2ans) == "E"
    assert M.parse_choice(long, options).index == 2
