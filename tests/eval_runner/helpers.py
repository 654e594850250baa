"""Helpers of the evaluation-room tests: tiny local data in the benchmarks' real schemas, a tiny local task."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tokenreduce.eval.sample import Sample
from tokenreduce.eval.task import Task


def png_bytes(colour=(200, 30, 30), size=(40, 60)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_video(path: Path, frames: int = 6, size: int = 32) -> Path:
    """A small MPEG-4 clip written with PyAV (no network, no external encoder)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class FakeLoader:
    """Stands in for ``datasets.load_dataset``: records every call, returns the rows given per config."""

    def __init__(self, rows_by_name: dict | None = None):
        self.calls: list[tuple[tuple, dict]] = []
        self.rows_by_name = rows_by_name or {}

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        name = args[1] if len(args) > 1 else kwargs.get("name")
        return list(self.rows_by_name.get(name, []))


# Colours of the shapes task, named by words the tiny models' word-level tokenizer knows (``w<i>``).
SHAPE_COLOURS = {"w20": (230, 40, 40), "w21": (40, 200, 60), "w22": (50, 80, 230), "w23": (240, 220, 40)}


class ShapesTask(Task):
    """A tiny local task for the tiny models: which colour is the square (image) / the moving square (video)?

    Deterministic from ``seed``; ``n`` samples; answers are the colour's vocabulary word.
    """

    max_new_tokens = 2

    def __init__(self, modality: str = "image", n: int = 8, seed: int = 0, size: int = 112):
        if modality not in ("image", "video"):
            raise ValueError(f"`modality` must be 'image' or 'video', got {modality!r}")
        self.modality, self.n, self.seed, self.size = modality, n, seed, size
        self.name = f"shapes-{modality}"

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[Sample]:
        from PIL import Image

        count = self.n if limit is None else min(self.n, limit)
        for i in range(count):
            rng = np.random.default_rng([self.seed, i])
            word = list(SHAPE_COLOURS)[i % len(SHAPE_COLOURS)]
            frames = 4 if self.modality == "video" else 1
            clip = np.full((frames, self.size, self.size, 3), 235, dtype=np.uint8)
            side = self.size // 4
            y, x = rng.integers(0, self.size - side, size=2)
            for t in range(frames):
                xt = int(min(self.size - side, x + 6 * t))
                clip[t, y : y + side, xt : xt + side] = SHAPE_COLOURS[word]
            media = {"images": [Image.fromarray(clip[0])]} if self.modality == "image" else {"video": clip}
            yield Sample(id=f"{self.name}-{i}", task=self.name, modality=self.modality, question="w100 w101 w102 w103",
                         answer=word, meta={"category": word}, **media)

    def parse(self, text: str, sample: Sample) -> str:
        words = text.split()
        return words[0] if words else ""

    def score(self, prediction: Any, sample: Sample) -> float:
        return float(prediction == sample.answer)
