"""Official metrics of the VQA benchmarks, implemented from their definitions.

Every scorer follows the benchmark's official evaluation code where one exists; where lmms-eval (the
common reference harness) deviates, the deviation is named in the function's docstring, so numbers from
here and from lmms-eval can be told apart:

* VQA accuracy (VQAv2, TextVQA): the EvalAI answer processor on the prediction always; on the ground truth
  only ``processPunctuation`` and only when the ten answers disagree (lmms-eval applies the full
  processor to the ground truth, and does so even when the answers agree). ``gt_processing="lmms"``
  reproduces lmms-eval's variant.
* ANLS (DocVQA, InfoVQA): an answer at normalised distance exactly ``tau`` scores 0 (the paper's
  ``NL >= tau``); lmms-eval keeps ``1 - tau`` there.
* POPE: ``yes_ratio`` is the share of *predicted* "yes" (lmms-eval divides ground-truth yes counts).
* Multiple choice (NExT-QA, MVBench): an answer that cannot be parsed is wrong and recorded as a parse
  failure; lmms-eval picks a random option instead.
* MVBench overall: mean of the per-subtask accuracies (lmms-eval reports no overall and divides by the
  non-empty predictions only).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# ----------------------------------------------------------------------------------------------------
# VQA accuracy: the EvalAI answer processor (VQA v2 / TextVQA official evaluation)
# ----------------------------------------------------------------------------------------------------

# The official processor's contraction table (including its own oddities such as "somebody'd").
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
# Verbatim from the official processor, typo included: "(?!<=\d)" is a negative LOOKAHEAD for "<=<digit>",
# not the lookbehind it was meant to be, so a period is dropped whenever no digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most 32 periods are removed. Kept for bit-exact agreement.
_PERIOD_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
    """EvalAI ``processPunctuation``: drop or space out punctuation, strip periods not before a digit.

    A punctuation mark is deleted when it touches a space anywhere in the text (or the text holds a digit
    comma digit group), otherwise replaced by a space: ``"yes!"`` -> ``"yes "``, ``"10,000"`` -> ``"10000"``.
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """EvalAI ``processDigitArticle``: lower case, number words to digits, articles dropped, contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """The full EvalAI processing applied to a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str], gt_processing: str = "official") -> float:
    """VQA accuracy of one prediction against the (usually ten) human answers, in [0, 1].

    For each human answer, the other ``n - 1`` are taken and ``min(1, #matches / 3)`` computed; the result
    is the mean over the ``n`` leave-one-out subsets (10-choose-9 averaging).

    ``gt_processing="official"`` follows the official scorer: the prediction is always fully normalised;
    the human answers get ``processPunctuation`` only, and only when they are not all identical (the
    official annotations are already normalised, so agreeing answers are used as they are).
    ``"lmms"`` is lmms-eval's variant (human answers stripped; full processing of answers and prediction
    when the answers disagree).
    """
    if gt_processing not in ("official", "lmms"):
        raise ValueError(f"`gt_processing` must be 'official' or 'lmms', got {gt_processing!r}")
    answers = [str(a) for a in answers]
    if not answers:
        raise ValueError("`answers` is empty: VQA accuracy needs the human answers of the question")
    pred = vqa_normalize(prediction)
    if gt_processing == "official":
        gts = [vqa_process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    else:
        gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(gts)) > 1:
            gts = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in gts]
            pred = vqa_process_digit_article(vqa_process_punctuation(pred))
    total = 0.0
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        total += min(1.0, sum(1 for g in others if g == pred) / 3.0)
    return total / len(gts)


# ----------------------------------------------------------------------------------------------------
# GQA exact match
# ----------------------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def gqa_normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def gqa_exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer (GQA's accuracy), else 0.0."""
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


# ----------------------------------------------------------------------------------------------------
# ANLS (DocVQA / InfoVQA)
# ----------------------------------------------------------------------------------------------------


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    """Edit distance divided by the longer length (0 for two empty strings)."""
    import Levenshtein

    length = max(len(a), len(b))
    return 0.0 if length == 0 else Levenshtein.distance(a, b) / length


def anls(prediction: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction against the accepted answers.

    Both sides are lower-cased with whitespace collapsed; ``NL`` is the edit distance over the longer
    length; the score is ``1 - min NL`` over the answers, or 0 when that ``NL >= tau`` (the DocVQA
    definition; lmms-eval zeroes only ``NL > tau``).
    """
    if not answers:
        raise ValueError("`answers` is empty: ANLS needs at least one accepted answer")
    pred = _anls_normalize(prediction)
    best = min(normalized_levenshtein(_anls_normalize(str(a)), pred) for a in answers)
    return 0.0 if best >= tau else 1.0 - best


# ----------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ----------------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> float:
    """ChartQA's relaxed accuracy of one answer (Methani et al.; pix2struct's reference code).

    When both parse as numbers (a trailing ``%`` divides by 100) and the target is non-zero, the answer is
    right within ``max_relative_change`` relative error; otherwise (text answers, and zero targets) it must
    match case-insensitively. Surrounding whitespace is ignored.
    """
    prediction, target = prediction.strip(), str(target).strip()
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:
        return float(abs(pred_f - target_f) / abs(target_f) <= max_relative_change)
    return float(prediction.lower() == target.lower())


# ----------------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """The official POPE parsing: first sentence, commas removed, ``no`` if any word is No / not / no.

    Words are split on single spaces exactly as the official script does, so ``"NO"`` reads as "yes"
    (it is none of the three words) and ``"Yes, there is"`` reads as "yes".
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of the parsed predictions.

    ``predictions`` are raw model outputs (parsed with :func:`pope_parse`); ``answers`` are "yes"/"no".
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    tp = fp = tn = fn = 0
    for pred_text, answer in zip(predictions, answers):
        pred = pope_parse(pred_text) == "yes"
        gold = str(answer).strip().lower() != "no"
        tp += pred and gold
        fp += pred and not gold
        tn += (not pred) and not gold
        fn += (not pred) and gold
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


# ----------------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME's official parsing: ``yes`` / ``no`` exactly, else ``yes`` or ``no`` inside the first 4
    characters, else ``other`` (lower-cased and stripped first)."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-category acc and acc+ (x100) and the perception / cognition sums of MME.

    Each record holds ``category``, ``image`` (the image both questions are asked about), ``prediction``
    (raw text) and ``answer`` ("Yes"/"No"). A category's score is acc + acc+ (max 200), acc+ counting an
    image right only when all its questions are; perception sums the 10 perception categories (max 2000),
    cognition the 4 cognition ones (max 800). Categories absent from the records count 0 in the sums.
    """
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    for r in records:
        pred = mme_parse(str(r["prediction"]))
        other[r["category"]] += pred == "other"
        by_cat[r["category"]][str(r["image"])].append(pred == str(r["answer"]).strip().lower())
    categories: dict[str, dict[str, float]] = {}
    for cat, images in sorted(by_cat.items()):
        flat = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(flat),
                           "other_answers": other[cat]}
    perception = sum(categories[c]["score"] for c in MME_PERCEPTION if c in categories)
    cognition = sum(categories[c]["score"] for c in MME_COGNITION if c in categories)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "categories": categories,
            "missing_categories": [c for c in (*MME_PERCEPTION, *MME_COGNITION) if c not in categories]}


# ----------------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------------

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class ChoiceParse:
    """A parsed multiple-choice answer: the option index (None when unparseable) and the rule that fired."""

    index: int | None
    rule: str

    @property
    def letter(self) -> str | None:
        return None if self.index is None else LETTERS[self.index]


def _option_text(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def parse_choice(text: str, choices: Sequence[str]) -> ChoiceParse:
    """Which option a free-form answer names, or ``index=None``; never a guess.

    Rules, first match wins: a bare letter (``"B"``, ``"(B)"``, ``"B."``, ``"B)"``, ``"B:"`` at the start,
    alone or followed by text); ``"answer is B"`` / ``"answer: (B)"``; the option's text itself
    (punctuation and case ignored); a single option text contained in the answer; a single ``"(X)"``
    anywhere. A leading letter followed by a plain space (``"A dog ..."``) only counts when the rest is that
    option's text, since it reads as an article otherwise.
    """
    n = len(choices)
    if n == 0 or n > len(LETTERS):
        raise ValueError(f"`choices` must hold 1 to {len(LETTERS)} options, got {n}")
    valid = LETTERS[:n]
    t = text.strip()
    options = [_option_text(c) for c in choices]
    m = re.match(r"^\(?([A-Z])\)?\s*$", t)
    if m and m.group(1) in valid:
        return ChoiceParse(valid.index(m.group(1)), "letter")
    m = re.match(r"^(?:\(([A-Z])\)|([A-Z])[.:)])", t)
    if m:
        letter = m.group(1) or m.group(2)
        if letter in valid:
            return ChoiceParse(valid.index(letter), "letter")
    m = re.match(r"^([A-Z])\s+(.*)$", t, flags=re.S)
    if m and m.group(1) in valid and _option_text(m.group(2)) == options[valid.index(m.group(1))]:
        return ChoiceParse(valid.index(m.group(1)), "letter+text")
    m = re.search(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", t, flags=re.I)
    if m and m.group(1).upper() in valid and m.group(1).isupper():
        return ChoiceParse(valid.index(m.group(1)), "answer-is")
    norm = _option_text(t)
    exact = [i for i, o in enumerate(options) if o and o == norm]
    if len(exact) == 1:
        return ChoiceParse(exact[0], "text")
    contained = [i for i, o in enumerate(options) if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", norm)]
    if len(contained) == 1:
        return ChoiceParse(contained[0], "text-in-answer")
    parenthesised = {x for x in re.findall(r"\(([A-Z])\)", t) if x in valid}
    if len(parenthesised) == 1:
        return ChoiceParse(valid.index(parenthesised.pop()), "parenthesised")
    return ChoiceParse(None, "unparsed")


def choice_correct(text: str, choices: Sequence[str], answer_index: int) -> tuple[float, ChoiceParse]:
    """Score (1.0 / 0.0) of a free-form answer to a multiple-choice question, and how it was parsed.

    An unparseable answer scores 0 and is flagged by ``parse.index is None``; there is no random fallback.
    """
    if not 0 <= answer_index < len(choices):
        raise ValueError(f"`answer_index` must be in [0, {len(choices)}), got {answer_index}")
    parse = parse_choice(text, choices)
    return float(parse.index == answer_index), parse


def mean_over_groups(scores: Iterable[tuple[str, float]]) -> dict[str, Any]:
    """Per-group means and their unweighted mean (MVBench's overall: mean over subtasks)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for group, score in scores:
        groups[group].append(float(score))
    per = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    return {"overall": sum(per.values()) / len(per) if per else 0.0, "groups": per,
            "counts": {g: len(v) for g, v in sorted(groups.items())}}
