"""How the shipped models are prompted, how their output is read, and the benchmark's metric.

The prompt puts the question BEFORE the image / video placeholder (``"<question> <image> answer :"``): the
tiny models were trained that way, so every visual token can already attend to what is asked. The answer
is one word followed by EOS. The metric is exact match after normalisation (lower case, surrounding
punctuation stripped, first word only).
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence

from tokenreduce.eval.sample import Sample

from .vocab import IMAGE_TOKEN, VIDEO_TOKEN

PROMPT_TEMPLATE = "{question} {placeholder} answer :"


def prompt(sample: Sample) -> str:
    """The text fed to the processor for ``sample`` (its placeholder is expanded by the processor)."""
    placeholder = VIDEO_TOKEN if sample.modality == "video" else IMAGE_TOKEN
    return PROMPT_TEMPLATE.format(question=sample.question, placeholder=placeholder)


def _media(samples: Sequence[Sample]) -> dict:
    modalities = {s.modality for s in samples}
    if len(modalities) != 1:
        raise ValueError(f"a batch must hold one modality, got {sorted(modalities)}")
    if modalities == {"video"}:
        return {"videos": [s.video for s in samples]}
    return {"images": [im for s in samples for im in s.images]}


def encode_batch(samples: Sequence[Sample], processor, padding_side: str = "left") -> dict:
    """Model inputs (tensors) for a batch of samples of one modality, padded on ``padding_side``."""
    return dict(processor(text=[prompt(s) for s in samples], padding=True, padding_side=padding_side,
                          return_tensors="pt", **_media(samples)))


def encode(sample: Sample, processor) -> dict:
    """Model inputs (tensors, batch of one) for ``sample``."""
    return encode_batch([sample], processor)


def normalize_answer(text: str) -> str:
    """Lower case, first word, surrounding punctuation removed: ``" Red ."`` -> ``"red"``."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


def parse_answer(generated: str) -> str:
    """The answer in a model's generated text (its first word, normalised)."""
    return normalize_answer(generated)


def exact_match(prediction: str, answer: str) -> bool:
    """The benchmark's metric for one sample."""
    return normalize_answer(prediction) == normalize_answer(answer)


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy over all samples (``"all"``) and per ``meta["category"]``, in [0, 1]."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(samples, predictions):
        ok = exact_match(p, s.answer)
        hits["all"].append(ok)
        hits[s.meta.get("category", "none")].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
