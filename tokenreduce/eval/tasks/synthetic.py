"""The synthetic benchmark as runner tasks: ``synthetic-image``, ``synthetic-document``, ``synthetic-video``.

    from tokenreduce.eval.tasks import get_task
    task = get_task("synthetic-video")                      # the test split, in its fixed order
    task = get_task("synthetic-image", split="validation", seed=1)

Samples are generated on the fly (:mod:`tokenreduce.eval.synthetic`); the prompt is the one the shipped
tiny models were trained with (question, then the media placeholder, then ``answer :``), not a chat
template, whatever the model family. The answer is one word followed by EOS, scored by exact match.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tokenreduce.eval.sample import Sample
from tokenreduce.eval.synthetic import KINDS, SPLITS, exact_match, iter_synthetic, parse_answer
from tokenreduce.eval.synthetic import encode as encode_synthetic
from tokenreduce.eval.synthetic.benchmark import SPLIT_SIZES
from tokenreduce.eval.task import Task, check_media


class SyntheticTask(Task):
    """The ``kind`` benchmark (``"image"``, ``"document"`` or ``"video"``) of split ``split``, seed ``seed``.

    ``aggregate`` gives ``accuracy`` overall and per ``category`` (the base class's summary).
    """

    primary_metric = "accuracy"
    max_new_tokens = 2  # one answer word, then EOS

    def __init__(self, kind: str, split: str = "test", seed: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {seed!r}")
        self.kind, self.split, self.seed = kind, split, seed
        self.name = f"synthetic-{kind}"

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[Sample]:
        split = split or self.split
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        stop = SPLIT_SIZES[split] if limit is None else min(int(limit), SPLIT_SIZES[split])
        yield from iter_synthetic(self.kind, split, 0, stop, self.seed)

    def encode(self, sample: Sample, processor: Any, family: str) -> dict[str, Any]:
        """The shipped models' own prompt for any ``family``; media errors raise ``MediaError``."""
        check_media(sample)
        return encode_synthetic(sample, processor)

    def record_fields(self, sample: Sample) -> dict[str, Any]:
        """The category, and how many objects the scene or video holds (content-adaptive methods' stats)."""
        fields = super().record_fields(sample)
        if "objects" in sample.meta:
            fields["objects"] = len(sample.meta["objects"])
        return fields

    def parse(self, text: str, sample: Sample) -> str:
        return parse_answer(text)

    def score(self, prediction: Any, sample: Sample) -> float:
        return float(exact_match(str(prediction), sample.answer))


def _factory(kind: str):
    def factory(**options: Any) -> SyntheticTask:
        return SyntheticTask(kind, **options)

    return factory


# `get_task("synthetic-image")` and the other kinds; :mod:`tokenreduce.eval.tasks` registers them.
SYNTHETIC_TASKS = {f"synthetic-{kind}": _factory(kind) for kind in KINDS}
