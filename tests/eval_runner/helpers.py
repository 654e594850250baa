"""Helpers of the evaluation-room tests: tiny local data in the benchmarks' real schemas."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np


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
