"""Reading images and videos for evaluation: from bytes, paths, dataset cells or frame folders.

Every failure (missing file, undecodable bytes, a video without frames) raises :class:`MediaError`, which
the runner records as an error for that one sample before moving on.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif", ".npy")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class MediaError(ValueError):
    """An image or video of a sample is missing, unreadable or empty."""


def load_image(value: Any, base_dir: str | Path | None = None):
    """A PIL RGB image from a PIL image, raw bytes, a ``{"bytes", "path"}`` dataset cell or a file path.

    Relative paths resolve against ``base_dir``. The pixels are decoded here (not lazily), so a corrupt
    file fails now, as a :class:`MediaError` naming it.
    """
    from PIL import Image

    if value is None:
        raise MediaError("the sample has no image (the image field is empty)")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    source: Any = value
    label = "image bytes"
    if isinstance(value, dict):
        if value.get("bytes"):
            source = value["bytes"]
        elif value.get("path"):
            source = value["path"]
        else:
            raise MediaError(f"image cell has neither bytes nor path: keys {sorted(value)}")
    if isinstance(source, (bytes, bytearray)):
        stream: Any = io.BytesIO(source)
    else:
        path = resolve_path(source, base_dir)
        label = str(path)
        if not path.is_file():
            raise MediaError(f"image file not found: {path}")
        stream = path
    try:
        with Image.open(stream) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several unrelated types for bad data
        raise MediaError(f"cannot decode {label}: {type(exc).__name__}: {exc}") from exc


def resolve_path(value: str | Path, base_dir: str | Path | None) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def find_video(name: str, roots: Sequence[str | Path]) -> Path:
    """The video file (or frame folder) called ``name`` under one of ``roots``, with or without extension."""
    tried = []
    for root in roots:
        base = resolve_path(name, root)
        candidates = [base] + [base.with_name(base.name + ext) for ext in VIDEO_EXTENSIONS]
        for c in candidates:
            tried.append(str(c))
            if c.is_file() or (c.is_dir() and any(c.iterdir())):
                return c
    raise MediaError(f"video {name!r} not found; looked for: {', '.join(tried[:6])}{' ...' if len(tried) > 6 else ''}")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``total`` frames (all of them when fewer)."""
    if total <= 0:
        raise MediaError("the video has no frames")
    if num_frames <= 0 or total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()


def load_video(path: str | Path, num_frames: int = 8) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 frames sampled uniformly from a video file, ``.npy`` array or frame folder."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"video not found: {path}")
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        idx = sample_indices(len(frames), num_frames)
        return np.stack([np.asarray(load_image(frames[i])) for i in idx])
    if path.suffix == ".npy":
        try:
            array = np.load(path)
        except Exception as exc:
            raise MediaError(f"cannot read {path}: {exc}") from exc
        if array.ndim != 4 or array.shape[0] == 0 or array.shape[-1] != 3:
            raise MediaError(f"{path} holds an array of shape {array.shape}, not [T>0, H, W, 3] frames")
        return array[sample_indices(array.shape[0], num_frames)].astype(np.uint8)
    return _decode_with_av(path, num_frames)


def _decode_with_av(path: Path, num_frames: int) -> np.ndarray:
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as exc:
        raise MediaError(f"cannot decode video {path}: {type(exc).__name__}: {exc}") from exc
    idx = sample_indices(len(frames), num_frames)
    return np.stack([frames[i] for i in idx])


def check_video(video: Any) -> np.ndarray:
    """The frames of an in-memory video as ``[T, H, W, 3]`` uint8, or a :class:`MediaError`."""
    if video is None:
        raise MediaError("the sample has no video")
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[0] == 0 or array.shape[-1] != 3:
        raise MediaError(f"video of shape {tuple(array.shape)} is not [T>0, H, W, 3] frames")
    return array.astype(np.uint8, copy=False)
