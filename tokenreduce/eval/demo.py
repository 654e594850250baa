"""What ``tokenreduce demo`` evaluates: ONE place that names the demo's tasks and models.

TEMPORARY: until the synthetic benchmark (``tokenreduce.eval.synthetic``, with its trained tiny models)
lands, the demo runs a tiny inline task (:class:`InlineShapesTask`, a handful of generated pictures and
clips) on the random-weight tiny models of :mod:`tokenreduce.testing.tiny`. Random weights answer at
chance, so the demo's accuracy column is noise; its ``agree w/ none`` column (how often a reduced model
answers exactly like the unreduced one) and the token / FLOPs / time columns are meaningful. To switch
to the synthetic benchmark, replace :func:`demo_runs` only (see its docstring).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenreduce.eval.runner import ModelSpec
from tokenreduce.eval.sample import Sample
from tokenreduce.eval.task import Task

DEMO_METHODS = ("none", "random", "pool", "fastv", "pdrop")
DEMO_BUDGETS = (0.25, 0.5)

# Answers must be words the tiny models' word-level tokenizer knows (``w<i>``).
_COLOURS = {"w20": (230, 40, 40), "w21": (40, 200, 60), "w22": (50, 80, 230), "w23": (240, 220, 40)}


class InlineShapesTask(Task):
    """TEMPORARY demo task: which colour is the square (image) / the moving square (video)?

    Deterministic from ``seed``; ``n`` samples; answers are the colour's vocabulary word.
    """

    instruction = ""
    max_new_tokens = 2

    def __init__(self, modality: str = "image", n: int = 8, seed: int = 0, size: int = 112):
        if modality not in ("image", "video"):
            raise ValueError(f"`modality` must be 'image' or 'video', got {modality!r}")
        self.modality, self.n, self.seed, self.size = modality, n, seed, size
        self.name = f"demo-{modality}"

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[Sample]:
        count = self.n if limit is None else min(self.n, limit)
        for i in range(count):
            rng = np.random.default_rng([self.seed, i])
            word = list(_COLOURS)[i % len(_COLOURS)]
            frames = 4 if self.modality == "video" else 1
            clip = np.full((frames, self.size, self.size, 3), 235, dtype=np.uint8)
            side = self.size // 4
            y, x = rng.integers(0, self.size - side, size=2)
            for t in range(frames):
                xt = int(min(self.size - side, x + 6 * t))
                clip[t, y : y + side, xt : xt + side] = _COLOURS[word]
            question = "w100 w101 w102 w103"
            if self.modality == "image":
                from PIL import Image

                yield Sample(id=f"{self.name}-{i}", task=self.name, modality="image", question=question, answer=word,
                             images=[Image.fromarray(clip[0])], meta={"category": word})
            else:
                yield Sample(id=f"{self.name}-{i}", task=self.name, modality="video", question=question, answer=word,
                             video=clip, meta={"category": word})

    def parse(self, text: str, sample: Sample) -> str:
        words = text.split()
        return words[0] if words else ""

    def score(self, prediction: Any, sample: Sample) -> float:
        return float(prediction == sample.answer)


def _tiny(family: str):
    def factory():
        from tokenreduce.testing.tiny import tiny_model, tiny_processor

        return tiny_model(family, num_layers=8), tiny_processor(family)

    return factory


@dataclass
class DemoRun:
    """One run of the demo: a task, its models, and the grid."""

    name: str
    task: Task
    models: list[ModelSpec]
    methods: tuple[str, ...] = DEMO_METHODS
    budgets: tuple[float, ...] = DEMO_BUDGETS
    options: dict = field(default_factory=dict)


def demo_runs(n: int = 8) -> list[DemoRun]:
    """The demo's runs. TEMPORARY inline task and random tiny models.

    When ``tokenreduce.eval.synthetic`` lands, return instead one run per synthetic kind, e.g.::

        from tokenreduce.eval.synthetic import load_model, KINDS
        from tokenreduce.eval.tasks.synthetic import SyntheticTask   # wraps load_synthetic / encode / score
        return [DemoRun(f"demo-{k}", SyntheticTask(k, split="test"), [ModelSpec(f"synthetic-{k}",
                factory=lambda k=k: load_model(k))]) for k in KINDS]
    """
    return [
        DemoRun("demo-image", InlineShapesTask("image", n=n),
                [ModelSpec("tiny-llava", factory=_tiny("llava")), ModelSpec("tiny-qwen2-vl", factory=_tiny("qwen2_vl"))]),
        DemoRun("demo-video", InlineShapesTask("video", n=n), [ModelSpec("tiny-qwen2-vl", factory=_tiny("qwen2_vl"))]),
    ]


def _register() -> None:
    from tokenreduce.eval.tasks import register_task

    register_task("demo-image", lambda **kw: InlineShapesTask("image", **kw), overwrite=True)
    register_task("demo-video", lambda **kw: InlineShapesTask("video", **kw), overwrite=True)


_register()
