"""Video decoding: every backend returns the frames a full decode would sample, and only those."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenreduce.eval.media import MediaError, load_video, sample_indices

av = pytest.importorskip("av")


def write_h264(path: Path, frames: int, size: int = 64, gop: int = 7) -> Path:
    """An h264 clip with B-frames and a short GOP whose red channel encodes the frame index (4 * i)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "bf": "2", "crf": "10"}
        for i in range(frames):
            arr = np.full((size, size, 3), 4 * i, dtype=np.uint8)
            arr[: size // 2, :, 1] = 255 - 4 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_everything(path: Path) -> list[np.ndarray]:
    """The reference: every frame converted to RGB, in presentation order (what load_video did before)."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_h264(tmp_path_factory.mktemp("video") / "clip.mp4", frames=61)


@pytest.mark.parametrize("backend", ["av", "decord", None])
@pytest.mark.parametrize("num_frames", [1, 8, 32, 61, 100])
def test_backends_sample_the_frames_a_full_decode_samples(clip, backend, num_frames):
    if backend == "decord":
        pytest.importorskip("decord")
    every = decode_everything(clip)
    idx = sample_indices(len(every), num_frames)
    out = load_video(clip, num_frames, backend=backend)
    assert out.shape == (len(idx), 64, 64, 3) and out.dtype == np.uint8
    # the red channel says which frame each one is
    assert np.round(out[:, -1, -1, 0].astype(float) / 4).astype(int).tolist() == idx
    diff = np.abs(out.astype(int) - np.stack([every[i] for i in idx]).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8


def test_decord_failure_falls_back_to_av(tmp_path):
    """decord 0.6.0 cannot copy frames whose RGB rows are not 64-byte aligned (48 px wide): PyAV reads them."""
    decord = pytest.importorskip("decord")
    narrow = write_h264(tmp_path / "narrow.mp4", frames=20, size=48)
    with pytest.raises(decord.DECORDError):
        decord.VideoReader(str(narrow)).get_batch([0])
    out = load_video(narrow, 4)
    assert np.round(out[:, -1, -1, 0].astype(float) / 4).astype(int).tolist() == sample_indices(20, 4)


class CountingContainer:
    """A PyAV input container that records the presentation time of every frame it decodes."""

    def __init__(self, container, decoded: list):
        self._container, self._decoded = container, decoded

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._decoded.append(frame.pts)
            yield frame


def test_av_seeks_instead_of_decoding_every_frame(clip, monkeypatch):
    decoded: list = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k), decoded))
    out = load_video(clip, 3, backend="av")  # frames 0, 30 and 60 of 61, keyframes every 7
    assert np.round(out[:, -1, -1, 0].astype(float) / 4).astype(int).tolist() == [0, 30, 60]
    assert 3 <= len(decoded) <= 3 * 7 + 6  # at most one GOP (plus reordering delay) per sampled frame


def test_npy_videos_are_memory_mapped(tmp_path, monkeypatch):
    frames = np.arange(20 * 4 * 4 * 3, dtype=np.uint8).reshape(20, 4, 4, 3)
    np.save(tmp_path / "v.npy", frames)
    modes = []
    real_load = np.load

    def recording_load(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", recording_load)
    out = load_video(tmp_path / "v.npy", 4)
    assert modes == ["r"]
    assert not isinstance(out, np.memmap) and out.flags.owndata
    np.testing.assert_array_equal(out, frames[[0, 6, 13, 19]])


def test_errors_are_media_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    for backend in ("av", "decord", None):
        if backend == "decord":
            pytest.importorskip("decord")
        with pytest.raises(MediaError, match="cannot decode"):
            load_video(bad, 4, backend=backend)
    with pytest.raises(ValueError, match="backend='opencv'"):
        load_video(bad, 4, backend="opencv")
