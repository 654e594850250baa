"""One evaluation sample, shared by the synthetic benchmark and the real ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    id: str                      # unique within the task
    task: str                    # e.g. "synthetic/image", "vqav2"
    modality: str                # "image" or "video"
    question: str
    answer: str                  # canonical answer string
    choices: tuple[str, ...] | None = None
    images: list = field(default_factory=list)   # PIL images
    video: np.ndarray | None = None              # [T, H, W, 3] uint8 frames
    meta: dict = field(default_factory=dict)     # category, regions, captions, answers list, ...
