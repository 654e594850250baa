"""The benchmark's splits: deterministic generation on the fly, and a jsonl + media export.

Sample ``i`` of ``(kind, split, seed)`` is drawn from its own random stream
``SeedSequence(seed, spawn_key=(kind, split, i))``, so it does not depend on how many samples are asked
for, the three splits are independent streams, and categories cycle with ``i`` (balanced in every
prefix). Training draws from the train split only; the shipped models were never shown a validation or
test sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tokenreduce.eval.sample import Sample

from .documents import DOCUMENT_CATEGORIES, generate_document
from .scenes import IMAGE_CATEGORIES, generate_image
from .videos import VIDEO_CATEGORIES, generate_video

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SIZES: dict[str, int] = {"train": 50_000, "validation": 1_000, "test": 1_000}
CATEGORIES: dict[str, tuple[str, ...]] = {
    "image": IMAGE_CATEGORIES, "document": DOCUMENT_CATEGORIES, "video": VIDEO_CATEGORIES,
}
_KIND_CODES = {"image": 1, "document": 2, "video": 3}
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def _check(kind: str, split: str) -> None:
    if kind not in CATEGORIES:
        raise ValueError(f"unknown kind {kind!r}; known: {tuple(CATEGORIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")


def sample_rng(kind: str, split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The random stream of sample ``index`` of ``(kind, split, seed)``."""
    _check(kind, split)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KIND_CODES[kind], _SPLIT_CODES[split], index)))


def category_of(kind: str, index: int) -> str:
    """Categories cycle with the index, so every prefix of a split is balanced."""
    cats = CATEGORIES[kind]
    return cats[index % len(cats)]


def generate(kind: str, split: str, index: int, seed: int = 0, extra_questions: bool = False):
    """Sample ``index`` with the generator's internals: ``(Sample, label maps..., structure)``.

    The tuple is the kind's generator output (see :func:`~.scenes.generate_image`,
    :func:`~.documents.generate_document`, :func:`~.videos.generate_video`); training reads the label maps.
    """
    rng = sample_rng(kind, split, index, seed)
    sample_id = f"{kind}-{split}-{seed}-{index:06d}"
    category = category_of(kind, index)
    if kind == "image":
        return generate_image(rng, category, sample_id, extra_questions=extra_questions)
    if kind == "document":
        return generate_document(rng, category, sample_id)
    return generate_video(rng, category, sample_id)


def iter_synthetic(kind: str, split: str, start: int = 0, stop: int | None = None, seed: int = 0) -> Iterator[Sample]:
    """Samples ``start..stop`` of a split, lazily."""
    _check(kind, split)
    stop = SPLIT_SIZES[split] if stop is None else stop
    if not 0 <= start <= stop <= SPLIT_SIZES[split]:
        raise ValueError(f"sample range [{start}, {stop}) is outside the {split} split's {SPLIT_SIZES[split]} samples")
    for i in range(start, stop):
        yield generate(kind, split, i, seed)[0]


def load_synthetic(kind: str, split: str, n: int | None = None, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples (default: all) of the ``split`` of the ``kind`` benchmark.

    ``kind`` is ``"image"``, ``"document"`` or ``"video"``; ``split`` is ``"train"``, ``"validation"`` or
    ``"test"``. Deterministic: the same arguments give identical pixels, questions and answers, and the
    first ``n`` samples do not depend on ``n``. About 1 ms per image, 2 ms per page, 30 ms per video.
    """
    return list(iter_synthetic(kind, split, 0, n, seed))


def write_split(kind: str, split: str, out_dir: str | Path, n: int | None = None, seed: int = 0) -> Path:
    """Write a split as ``<kind>-<split>.jsonl`` plus media files (PNG images, ``.npy`` videos); returns the jsonl.

    Each line holds the sample's fields; media are referenced by path relative to ``out_dir``.
    """
    out = Path(out_dir)
    media = out / f"{kind}-{split}"
    media.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{split}.jsonl"
    with path.open("w") as f:
        for sample in iter_synthetic(kind, split, 0, n, seed):
            record = {"id": sample.id, "task": sample.task, "modality": sample.modality,
                      "question": sample.question, "answer": sample.answer,
                      "choices": list(sample.choices) if sample.choices else None, "meta": sample.meta,
                      "images": [], "video": None}
            for j, image in enumerate(sample.images):
                name = f"{media.name}/{sample.id}-{j}.png"
                image.save(out / name)
                record["images"].append(name)
            if sample.video is not None:
                name = f"{media.name}/{sample.id}.npy"
                np.save(out / name, sample.video)
                record["video"] = name
            f.write(json.dumps(record) + "\n")
    return path


def read_split(path: str | Path) -> list[Sample]:
    """Samples written by :func:`write_split` (pixels identical to the generated ones)."""
    path = Path(path)
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        images = []
        for name in record["images"]:
            with Image.open(path.parent / name) as im:
                images.append(im.convert("RGB"))
        video = np.load(path.parent / record["video"]) if record["video"] else None
        choices = tuple(record["choices"]) if record["choices"] else None
        out.append(Sample(id=record["id"], task=record["task"], modality=record["modality"],
                          question=record["question"], answer=record["answer"], choices=choices, images=images,
                          video=video, meta=record["meta"]))
    return out
