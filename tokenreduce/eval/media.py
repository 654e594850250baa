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


VIDEO_BACKENDS = ("decord", "av")


def load_video(path: str | Path, num_frames: int = 8, backend: str | None = None) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 frames sampled uniformly from a video file, ``.npy`` array or frame folder.

    Only the sampled frames are decoded and converted: a video file goes through decord when it is
    installed (``backend=None``) and through PyAV seeking otherwise, or when decord fails on the file (decord
    0.6.0 cannot copy frames whose RGB rows are not 64-byte aligned, e.g. 48 px wide);
    ``backend`` forces one of :data:`VIDEO_BACKENDS`. A ``.npy`` array is memory-mapped and only its
    sampled frames are copied. Every backend returns the frames :func:`sample_indices` names for the
    video's frame count.
    """
    if backend is not None and backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend={backend!r} is not a video backend; accepted: None, {', '.join(VIDEO_BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise MediaError(f"video not found: {path}")
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        idx = sample_indices(len(frames), num_frames)
        return np.stack([np.asarray(load_image(frames[i])) for i in idx])
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise MediaError(f"cannot read {path}: {exc}") from exc
        if array.ndim != 4 or array.shape[0] == 0 or array.shape[-1] != 3:
            raise MediaError(f"{path} holds an array of shape {array.shape}, not [T>0, H, W, 3] frames")
        return np.array(array[sample_indices(array.shape[0], num_frames)], dtype=np.uint8)
    if backend == "av":
        return _decode_with_av(path, num_frames)
    if backend is None and not _has_decord():
        return _decode_with_av(path, num_frames)
    try:
        return _decode_with_decord(path, num_frames)
    except MediaError as decord_error:
        if backend == "decord":
            raise
        try:
            return _decode_with_av(path, num_frames)
        except MediaError as av_error:
            raise MediaError(f"{av_error} (decord: {decord_error})") from av_error


def _has_decord() -> bool:
    from importlib.util import find_spec

    return find_spec("decord") is not None


def _decode_with_decord(path: Path, num_frames: int) -> np.ndarray:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
        idx = sample_indices(len(reader), num_frames)
        frames = reader.get_batch(idx).asnumpy()
    except MediaError:
        raise
    except Exception as exc:  # decord raises its own DECORDError and RuntimeError
        raise MediaError(f"cannot decode video {path} with decord: {type(exc).__name__}: {exc}") from exc
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _decode_with_av(path: Path, num_frames: int) -> np.ndarray:
    """PyAV: index the packets (no decoding), then decode from the keyframe before each sampled frame.

    Frames are counted from the demuxed packets, so the sampled indices match a full decode. Only the
    sampled frames are converted to RGB. Without presentation timestamps the clip is decoded in one
    forward pass instead, still converting only the sampled frames.
    """
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            pts, keyframes = [], []
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe and packet.pts is not None:
                    keyframes.append(packet.pts)
            idx = sample_indices(len(pts), num_frames)
            if keyframes and None not in pts:
                order = sorted(pts)
                frames = _seek_and_decode(container, stream, [order[i] for i in idx], sorted(keyframes))
                if frames is not None:
                    return np.stack(frames)
            container.seek(0, stream=stream)
            return np.stack(_decode_forward(container, stream, idx, len(pts)))
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises its own errors, IndexError for a file without video stream
        raise MediaError(f"cannot decode video {path}: {type(exc).__name__}: {exc}") from exc


def _seek_and_decode(container, stream, targets: list[int], keyframes: list[int]) -> list[np.ndarray] | None:
    """The frames with presentation times ``targets`` (ascending), or None when decoded frames carry none.

    Seeks only when the keyframe before the next target lies beyond the last decoded frame; otherwise
    decoding goes on from where it is.
    """
    from bisect import bisect_right

    found: dict[int, np.ndarray] = {}
    decoder = None
    last = None
    for target in targets:
        if target in found:
            continue
        keyframe = keyframes[max(bisect_right(keyframes, target) - 1, 0)]
        if decoder is None or last is None or keyframe > last or target <= last:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            decoder = container.decode(stream)
        for frame in decoder:
            if frame.pts is None:
                return None
            last = frame.pts
            if frame.pts == target:
                found[target] = frame.to_ndarray(format="rgb24")
                break
            if frame.pts > target:
                raise MediaError(f"no frame has presentation time {target} (the next one has {frame.pts})")
        else:
            raise MediaError(f"the video ended before the frame at presentation time {target}")
    return [found[t] for t in targets]


def _decode_forward(container, stream, idx: list[int], total: int) -> list[np.ndarray]:
    wanted = {}
    for i, position in enumerate(idx):
        wanted.setdefault(position, []).append(i)
    out: list[Any] = [None] * len(idx)
    count = 0
    for count, frame in enumerate(container.decode(stream), start=1):
        for slot in wanted.get(count - 1, ()):
            out[slot] = frame.to_ndarray(format="rgb24")
        if count > idx[-1]:
            break
    if any(f is None for f in out):
        raise MediaError(f"the video decoded to {count} frames although it has {total} packets")
    return out


def check_video(video: Any) -> np.ndarray:
    """The frames of an in-memory video as ``[T, H, W, 3]`` uint8, or a :class:`MediaError`."""
    if video is None:
        raise MediaError("the sample has no video")
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[0] == 0 or array.shape[-1] != 3:
        raise MediaError(f"video of shape {tuple(array.shape)} is not [T>0, H, W, 3] frames")
    return array.astype(np.uint8, copy=False)
