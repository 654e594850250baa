"""Time and peak memory of sampling frames from a long video, per decoding backend, in one run.

Generates a 60 s 1280x720 30 fps h264 clip with PyAV (moving gradients and a scrolling texture, so every
frame differs and the encoder makes P/B frames; GOP 250, libx264's default), then loads 8 and 32 uniformly sampled frames with every
backend of ``tokenreduce.eval.media.load_video``. Each measurement runs in a fresh child process: its
peak resident memory (``VmHWM``, which counts native allocations of the decoders as well) and the wall
time of the ``load_video`` call are what the child reports; the imports are done before the clock starts
and their resident size is reported apart (the media module is loaded from its file, without the
package's torch import). ``--with-full-decode`` also measures the former approach
(every frame converted to RGB, then 8 or 32 kept): slow and several GB.

    python benchmarks/video_decode.py
    python benchmarks/video_decode.py --with-full-decode --frames 8

Results go to ``benchmarks/results/video_decode_cpu.md`` unless ``--out`` names a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MEDIA = Path(__file__).resolve().parents[1] / "tokenreduce" / "eval" / "media.py"

CHILD = r"""
import importlib.util, json, sys, time
import numpy as np
import av, decord  # both imported before measuring, whatever the backend

# the module file alone: importing the tokenreduce package would load torch (~700 MB) first
spec = importlib.util.spec_from_file_location("media", sys.argv[4])
media = importlib.util.module_from_spec(spec)
spec.loader.exec_module(media)
load_video, sample_indices = media.load_video, media.sample_indices

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

path, frames, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before = rss("VmRSS:")
start = time.perf_counter()
if backend == "full-decode":
    with av.open(path) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    out = np.stack([every[i] for i in sample_indices(len(every), frames)])
else:
    out = load_video(path, frames, backend=backend)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": rss("VmHWM:"), "import_mb": before,
                  "shape": list(out.shape), "checksum": float(out.mean())}))
"""


def write_clip(path: Path, seconds: int, width: int, height: int, fps: int) -> None:
    """An h264 clip whose frames all differ: moving gradients and a scrolling blocky
    texture, at 3 Mbit/s (about 22 MB per minute, like a web 720p video)."""
    import av

    blocks = np.random.default_rng(0).integers(0, 48, size=(height // 16 + 1, width // 16 + 1, 1), dtype=np.uint8)
    texture = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)[:height, :width]
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 3_000_000
        stream.options = {"preset": "ultrafast", "g": "250", "bf": "2"}
        for i in range(seconds * fps):
            frame = np.empty((height, width, 3), dtype=np.uint8)
            frame[..., 0] = ((xs + 4 * i) % 256).astype(np.uint8)
            frame[..., 1] = ((ys + 2 * i) % 256).astype(np.uint8)
            frame[..., 2] = (i * 255 // (seconds * fps))
            frame += np.roll(texture, 3 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def measure(path: Path, frames: int, backend: str) -> dict:
    """One load in a fresh interpreter; its own report of wall time and peak resident memory."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(frames), backend, str(MEDIA)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"backend {backend} with {frames} frames failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--size", type=int, nargs=2, default=(1280, 720), metavar=("W", "H"))
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--backends", nargs="+", default=["decord", "av"], choices=["decord", "av", "full-decode"])
    parser.add_argument("--with-full-decode", action="store_true", help="also measure the every-frame decode")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell; the median is kept")
    parser.add_argument("--clip", type=Path, help="reuse this clip instead of generating one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    backends = list(args.backends) + (["full-decode"] if args.with_full_decode else [])

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or Path(tmp) / "clip.mp4"
        if not clip.exists():
            start = time.perf_counter()
            write_clip(clip, args.seconds, *args.size, args.fps)
            print(f"wrote {clip} ({clip.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
        rows = []
        for frames in args.frames:
            for backend in backends:
                runs = [measure(clip, frames, backend) for _ in range(1 if backend == "full-decode" else args.repeats)]
                runs.sort(key=lambda r: r["seconds"])
                best = runs[len(runs) // 2]
                rows.append({"frames": frames, "backend": backend, **best,
                             "peak_mb": max(r["peak_mb"] for r in runs)})
                print(f"{backend:12s} {frames:3d} frames: {best['seconds']:.3f} s, peak {rows[-1]['peak_mb']:.0f} MB "
                      f"(after imports {best['import_mb']:.0f} MB), shape {best['shape']}")
        sums = {}
        for r in rows:
            sums.setdefault(r["frames"], set()).add(round(r["checksum"], 3))
        same = all(len(v) == 1 for v in sums.values())
        print("same frames from every backend (mean pixel):", "yes" if same else f"no: {sums}")

    lines = [
        f"# Sampling frames from a {args.seconds} s {args.size[0]}x{args.size[1]} {args.fps} fps h264 clip",
        "",
        f"`python benchmarks/video_decode.py{' --with-full-decode' if args.with_full_decode else ''}` on "
        f"{platform.processor() or platform.machine()}, {platform.python_version()}; each cell is a fresh process "
        f"(median wall time of {args.repeats} for the sampling backends, the highest VmHWM).",
        "Peak memory is the whole process's peak resident set (VmHWM), imports of numpy, PyAV, decord and the "
        "`tokenreduce/eval/media.py` module file included (their resident size is the last column).",
        "",
        "| backend | frames | seconds | peak MB | MB after imports |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['backend']} | {r['frames']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | {r['import_mb']:.0f} |"
              for r in rows]
    lines += ["", f"- same frames from every backend (mean pixel per frame count): {'yes' if same else 'no'}"]
    out = args.out or RESULTS / "video_decode_cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
