"""The sample type every benchmark yields (the synthetic one now, real ones later).

A sample is one question about one image (a document page is an image) or one video, with its canonical
answer. ``meta`` carries what analysis needs beyond the question: the category, the pixel boxes (and
frames) of the regions the answer depends on, ground-truth captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One benchmark question.

    Attributes:
        id: unique within the task.
        task: e.g. ``"synthetic/image"``, ``"synthetic/document"``, ``"synthetic/video"``.
        modality: ``"image"`` or ``"video"``.
        question: the question text, without any prompt template.
        answer: the canonical answer string.
        choices: the options of a multiple-choice question, else None.
        images: PIL images (a document is one page image).
        video: ``[T, H, W, 3]`` uint8 frames, or None.
        meta: category, regions, captions and anything else a benchmark records.
    """

    id: str
    task: str
    modality: str
    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    images: list = field(default_factory=list)
    video: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
