"""Official metrics of the VQA benchmarks, implemented from their definitions.

Every scorer follows the benchmark's official evaluation code where one exists; where lmms-eval (the
common reference harness) deviates, the deviation is named in the function's docstring, so numbers from
here and from lmms-eval can be told apart:

* VQA accuracy (VQAv2, TextVQA): the EvalAI answer processor on the prediction always; on the ground truth
  only ``processPunctuation`` and only when the ten answers disagree (lmms-eval applies the full
  processor to the ground truth, and does so even when the answers agree). ``gt_processing="lmms"``
  reproduces lmms-eval's VQAv2 scorer and ``"lmms_textvqa"`` its TextVQA scorer (which also lower-cases
  and drops "," and "?" first).
* ANLS (DocVQA, InfoVQA): the official scorer's code, which lmms-eval copies: the length that divides the
  edit distance is taken from the answers before whitespace is collapsed, and an answer at ``NL == tau``
  keeps ``1 - tau`` (the paper writes ``NL >= tau`` -> 0; the code zeroes ``NL > tau`` only).
* POPE: the official parsing (first sentence, "no"/"not"/"No" words) and ``yes_ratio`` the share of
  *predicted* "yes"; lmms-eval compares the raw lower-cased answer with "yes"/"no" and divides
  ground-truth yes counts. ``parsing="lmms"`` reproduces lmms-eval.
* MME: the official parser; ``mode="lmms"`` is lmms-eval's (periods dropped, "y"/"n" accepted).
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
# lmms-eval copies mmf's processor, whose comma rule also accepts runs of commas ("1,,2").
_COMMA_STRIP_LMMS = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most 32 periods are removed. Kept for bit-exact agreement.
_PERIOD_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str, comma_strip: re.Pattern = _COMMA_STRIP) -> str:
    """EvalAI ``processPunctuation``: drop or space out punctuation, strip periods not before a digit.

    A punctuation mark is deleted when it touches a space anywhere in the text (or the text holds a digit
    comma digit group), otherwise replaced by a space: ``"yes!"`` -> ``"yes "``, ``"10,000"`` -> ``"10000"``.
    """
    out = text
    has_digit_comma = comma_strip.search(text) is not None
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
    answer = _vqa_clean(answer)
    return vqa_process_digit_article(vqa_process_punctuation(answer))


VQA_GT_PROCESSING = ("official", "lmms", "lmms_textvqa")


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_lmms_normalize(text: str) -> str:
    return vqa_process_digit_article(vqa_process_punctuation(_vqa_clean(text), _COMMA_STRIP_LMMS))


def _vqa_lmms_textvqa_normalize(text: str) -> str:
    # mmf's ``word_tokenize`` runs first in lmms-eval's TextVQA scorer
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _vqa_lmms_normalize(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], gt_processing: str = "official") -> float:
    """VQA accuracy of one prediction against the (usually ten) human answers, in [0, 1].

    For each human answer, the other ``n - 1`` are taken and ``min(1, #matches / 3)`` computed; the result
    is the mean over the ``n`` leave-one-out subsets (10-choose-9 averaging).

    ``gt_processing="official"`` follows the official scorer: the prediction is always fully normalised;
    the human answers get ``processPunctuation`` only, and only when they are not all identical (the
    official annotations are already normalised, so agreeing answers are used as they are).
    ``"lmms"`` is lmms-eval's ``vqav2_process_results``: the full processing (with mmf's comma rule) on
    the prediction and on every human answer, whether they agree or not, so ``"2"`` matches ten ``"two"``.
    ``"lmms_textvqa"`` is its ``textvqa_process_results``: the same after lower-casing, dropping "," and
    "?" and spacing out "'s".
    """
    if gt_processing not in VQA_GT_PROCESSING:
        raise ValueError(f"`gt_processing` must be one of {VQA_GT_PROCESSING}, got {gt_processing!r}")
    answers = [str(a) for a in answers]
    if not answers:
        raise ValueError("`answers` is empty: VQA accuracy needs the human answers of the question")
    if gt_processing == "official":
        pred = vqa_normalize(prediction)
        gts = [vqa_process_punctuation(a) for a in answers] if len(set(answers)) > 1 else answers
    else:
        normalize = _vqa_lmms_normalize if gt_processing == "lmms" else _vqa_lmms_textvqa_normalize
        pred = normalize(prediction)
        gts = [normalize(a) for a in answers]
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
    """Lower case, ASCII punctuation removed (lmms-eval's ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation``; whitespace is kept as it is)."""
    return text.lower().translate(_PUNCT_TABLE)


def gqa_exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer (GQA's accuracy), else 0.0.

    Equal to lmms-eval's GQA metric; the official GQA script compares the strings unchanged.
    """
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


# ----------------------------------------------------------------------------------------------------
# ANLS (DocVQA / InfoVQA)
# ----------------------------------------------------------------------------------------------------


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction against the accepted answers.

    As the official DocVQA / InfographicVQA scorer computes it (and lmms-eval, which copies it): the edit
    distance is taken between the lower-cased, whitespace-collapsed strings, but divided by the longer
    length of the strings *as given* (``"  abd  "`` vs ``"abc"``: 1 / 7, score 0.857); the score is
    ``1 - min NL`` over the answers, set to 0 when it falls below ``1 - tau`` (so ``NL == tau`` keeps
    ``1 - tau``, where the paper's formula writes ``NL >= tau`` -> 0).
    """
    import Levenshtein

    if not answers:
        raise ValueError("`answers` is empty: ANLS needs at least one accepted answer")
    pred = _anls_normalize(prediction)
    values = []
    for answer in answers:
        answer = str(answer)
        length = max(len(answer.upper()), len(prediction.upper()))
        dist = Levenshtein.distance(_anls_normalize(answer), pred)
        values.append(0.0 if length == 0 else dist / length)
    score = 1.0 - min(values)
    return 0.0 if score < 1.0 - tau else score


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
    match case-insensitively. Equal to lmms-eval's ``relaxed_correctness``; whitespace counts (the runner
    strips generated text before scoring).
    """
    target = str(target)
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


POPE_PARSING = ("official", "lmms")


def pope_metrics(predictions: Sequence[str], answers: Sequence[str], parsing: str = "official") -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of the parsed predictions.

    ``predictions`` are raw model outputs; ``answers`` are "yes"/"no". ``parsing="official"`` reads them
    with :func:`pope_parse` and reports the share of predicted "yes" as ``yes_ratio``.
    ``parsing="lmms"`` reproduces lmms-eval's POPE scorer: the lower-cased, stripped output must equal
    "yes" or "no" (anything else is wrong and left out of precision and recall) and ``yes_ratio`` is the
    share of "yes" in the *ground truth*.
    """
    if parsing not in POPE_PARSING:
        raise ValueError(f"`parsing` must be one of {POPE_PARSING}, got {parsing!r}")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if parsing == "lmms":
        return _pope_metrics_lmms(predictions, answers)
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


def _pope_metrics_lmms(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    preds = [str(p).lower().strip() for p in predictions]
    golds = [str(a).lower().strip() for a in answers]
    pairs = list(zip(preds, golds))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    gold_yes = sum(g == "yes" for g in golds)
    gold_known = gold_yes + sum(g == "no" for g in golds)
    return {
        "accuracy": sum(p == g for p, g in pairs) / n if n else 0.0, "precision": precision, "recall": recall,
        "f1": f1, "yes_ratio": gold_yes / gold_known if gold_known else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


# ----------------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


MME_PARSING = ("official", "lmms")


def mme_parse(text: str, mode: str = "official") -> str:
    """MME's official parsing: ``yes`` / ``no`` exactly, else ``yes`` or ``no`` inside the first 4
    characters, else ``other`` (lower-cased and stripped first).

    ``mode="lmms"`` is lmms-eval's ``parse_pred_ans`` (from Otter): periods are removed first and a
    one-character answer reads ``y`` as yes and ``n`` as no (``other`` for any other single character).
    """
    if mode not in MME_PARSING:
        raise ValueError(f"`mode` must be one of {MME_PARSING}, got {mode!r}")
    text = text.strip().lower()
    if mode == "lmms":
        text = text.replace(".", "")
        if len(text) == 1 and text not in ("y", "n"):
            return "other"
        text = {"y": "yes", "n": "no"}.get(text, text)
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping[str, Any]], parsing: str = "official") -> dict[str, Any]:
    """Per-category acc and acc+ (x100) and the perception / cognition sums of MME.

    Each record holds ``category``, ``image`` (the image both questions are asked about), ``prediction``
    (raw text) and ``answer`` ("Yes"/"No"). A category's score is acc + acc+ (max 200), acc+ counting an
    image right only when all its questions are; perception sums the 10 perception categories (max 2000),
    cognition the 4 cognition ones (max 800). Categories absent from the records count 0 in the sums.
    ``parsing`` is the :func:`mme_parse` mode.
    """
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    for r in records:
        pred = mme_parse(str(r["prediction"]), parsing)
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

    Rules, first match wins: a bare letter (``"B"``, ``"b"``, ``"(B)"``, ``"B."``, ``"B)"``, ``"B:"`` at the start,
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
    m = re.match(r"^\(?([A-Za-z])\)?\s*$", t)
    if m and m.group(1).upper() in valid:
        return ChoiceParse(valid.index(m.group(1).upper()), "letter")
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
