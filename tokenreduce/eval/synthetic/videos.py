"""Videos: a static textured scene in which one to three objects move, change colour, appear or disappear.

16 frames of 168x168: a static background, two or three static shapes, and the dynamic objects. Shapes
(24-28 px) are centred in the cells of a 28-px grid, the grid of LLaVA-OneVision's 2x2-pooled video
tokens, so a shape is four patches and one pooled token per frame; a moving shape hops from cell to
neighbouring cell (a one-cell step every few frames, 2-4 cells in all). Questions
ask which way an object moves, what colour a shape turns, which of two shapes appears first, and what
happens to a shape (moves / changes / appears / disappears). The answer depends on one or two objects in
some of the frames; everything else (most tokens of most frames) repeats the first frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenreduce.eval.sample import Sample

from .render import background, boxes_overlap, jittered_colour, paste, shape_coverage, to_uint8
from .scenes import article, list_phrase
from .vocab import COLOUR_NAMES, DIRECTIONS, EVENTS, SHAPES, TEXTURES

FRAME_SIZE = 168
NUM_FRAMES = 16
VIDEO_CATEGORIES: tuple[str, ...] = ("motion", "change", "order", "event")
MIN_OBJECT, MAX_OBJECT = 24, 28
CELL = 28  # one pooled video token
GRID = FRAME_SIZE // CELL
SEGMENT_FRAMES = 4
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class Track:
    """One object through the video: per-frame position, visibility and colour, and what happens to it."""

    shape: str
    size: int
    x0: np.ndarray  # [T] int
    y0: np.ndarray  # [T] int
    visible: np.ndarray  # [T] bool
    colours: list[str]
    event: str | None = None  # "moves", "changes", "appears", "disappears" or None (static)
    event_frames: tuple[int, int] = (0, 0)  # first and last frame over which the event happens
    direction: str | None = None
    swept: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))

    def box(self, t: int) -> tuple[int, int, int, int]:
        x0, y0 = int(self.x0[t]), int(self.y0[t])
        return (x0, y0, x0 + self.size, y0 + self.size)

    def name(self, t: int = 0) -> str:
        return f"{self.colours[t]} {self.shape}"


def _static(rng: np.random.Generator, shape: str, colour: str, size: int, x0: int, y0: int) -> Track:
    t = NUM_FRAMES
    return Track(shape, size, np.full(t, x0), np.full(t, y0), np.ones(t, bool), [colour] * t)


def _make_track(rng: np.random.Generator, shape: str, colour: str, event: str | None, **kw) -> Track | None:
    """A track of ``event`` (None: static) in a random cell; None when the motion does not fit in the frame."""
    size = int(rng.integers(MIN_OBJECT, MAX_OBJECT + 1))
    offset = (CELL - size) // 2
    cx, cy = (int(v) for v in rng.integers(0, GRID, size=2))
    track = _static(rng, shape, colour, size, cx * CELL + offset, cy * CELL + offset)
    if event == "moves":
        direction = kw.get("direction") or str(rng.choice(DIRECTIONS))
        start = int(rng.integers(0, 5))
        end = int(rng.integers(start + 8, NUM_FRAMES))
        cells = int(rng.integers(2, 5))
        dx, dy = _STEP[direction]
        if not (0 <= cx + dx * cells < GRID and 0 <= cy + dy * cells < GRID):
            return None
        steps = np.rint(np.clip((np.arange(NUM_FRAMES) - start) / (end - start), 0, 1) * cells).astype(int)
        track.x0 = (cx + dx * steps) * CELL + offset
        track.y0 = (cy + dy * steps) * CELL + offset
        track.direction, track.event_frames = direction, (start, end)
    elif event == "changes":
        at = int(kw.get("at", rng.integers(3, 13)))
        new = kw.get("new") or str(rng.choice([c for c in COLOUR_NAMES if c != colour]))
        track.colours = [colour] * at + [new] * (NUM_FRAMES - at)
        track.event_frames = (at, at)
    elif event == "appears":
        at = int(kw.get("at", rng.integers(2, 14)))
        track.visible[:at] = False
        track.event_frames = (at, at)
    elif event == "disappears":
        at = int(kw.get("at", rng.integers(3, 14)))
        track.visible[at:] = False
        track.event_frames = (at, at)
    track.event = event
    cells_x = [int(x) // CELL for x in track.x0]
    cells_y = [int(y) // CELL for y in track.y0]
    track.swept = (min(cells_x) * CELL, min(cells_y) * CELL, (max(cells_x) + 1) * CELL, (max(cells_y) + 1) * CELL)
    return track


def _add(rng: np.random.Generator, tracks: list[Track], shape: str, colour: str, event: str | None, **kw) -> bool:
    for _ in range(200):
        track = _make_track(rng, shape, colour, event, **kw)
        if track is not None and not any(boxes_overlap(track.swept, t.swept) for t in tracks):
            tracks.append(track)
            return True
    return False


def build_video(rng: np.random.Generator, category: str):
    """Tracks (referents first) and ``(question, answer, number of referents)`` for ``category``."""
    for _ in range(100):
        shapes = [str(s) for s in rng.permutation(SHAPES)]
        tracks: list[Track] = []
        if category == "motion":
            direction = str(rng.choice(DIRECTIONS))
            colour = str(rng.choice(COLOUR_NAMES))
            ok = _add(rng, tracks, shapes[0], colour, "moves", direction=direction)
            question = f"which way does the {colour} {shapes[0]} move ?"
            answer, referents = direction, 1
        elif category == "change":
            old, new = (str(c) for c in rng.choice(COLOUR_NAMES, size=2, replace=False))
            ok = _add(rng, tracks, shapes[0], old, "changes", new=new)
            question = f"what colour does the {shapes[0]} turn ?"
            answer, referents = new, 1
        elif category == "order":
            first, second = sorted(int(v) for v in rng.choice(np.arange(1, 14), size=2, replace=False))
            if second - first < 3:
                continue
            ok = _add(rng, tracks, shapes[0], str(rng.choice(COLOUR_NAMES)), "appears", at=first)
            ok = ok and _add(rng, tracks, shapes[1], str(rng.choice(COLOUR_NAMES)), "appears", at=second)
            asked = [shapes[0], shapes[1]] if rng.random() < 0.5 else [shapes[1], shapes[0]]
            question = f"which appears first , the {asked[0]} or the {asked[1]} ?"
            answer, referents = shapes[0], 2
        elif category == "event":
            event = str(rng.choice(EVENTS))
            ok = _add(rng, tracks, shapes[0], str(rng.choice(COLOUR_NAMES)), event)
            question = f"what happens to the {shapes[0]} ?"
            answer, referents = event, 1
        else:
            raise ValueError(f"unknown video category {category!r}; known: {VIDEO_CATEGORIES}")
        if not ok:
            continue
        # Another dynamic object (of a shape not asked about) half of the time, then static ones.
        used = {t.shape for t in tracks}
        free = [s for s in shapes if s not in used]
        if rng.random() < 0.5:
            ok = _add(rng, tracks, free.pop(0), str(rng.choice(COLOUR_NAMES)), str(rng.choice(EVENTS)))
        for _ in range(int(rng.integers(2, 4))):
            if not free:
                break
            ok = ok and _add(rng, tracks, free.pop(0), str(rng.choice(COLOUR_NAMES)), None)
        if ok:
            return tracks, question, answer, referents
    raise RuntimeError(f"could not build a {category!r} video")  # pragma: no cover - never seen


def render_video(rng: np.random.Generator, tracks: list[Track], texture: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames (uint8 ``[T, H, W, 3]``) and per-frame object index maps (int16 ``[T, H, W]``, -1 elsewhere)."""
    base = background(rng, FRAME_SIZE, FRAME_SIZE, texture)
    # each colour once, in order of appearance (iterating a set would follow the per-process string hash)
    tints = [{c: jittered_colour(rng, c) for c in dict.fromkeys(tr.colours)} for tr in tracks]
    frames = np.empty((NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    maps = np.full((NUM_FRAMES, FRAME_SIZE, FRAME_SIZE), -1, np.int16)
    for t in range(NUM_FRAMES):
        canvas = base.copy()
        for i, tr in enumerate(tracks):
            if tr.visible[t]:
                x0, y0, _, _ = tr.box(t)
                paste(canvas, shape_coverage(tr.shape, tr.size), tints[i][tr.colours[t]], x0, y0, maps[t], i)
        frames[t] = to_uint8(canvas)
    return frames, maps


def _happening(tr: Track, lo: int, hi: int) -> str | None:
    """What ``tr`` does within frames ``lo..hi`` (inclusive), as a sentence, or None.

    An event belongs to the frames that show it against the frame before: a change, appearance or
    disappearance to the first frame that shows it, a motion to every frame where the object has just
    stepped to the next cell (a slow motion rests in its cell for a few frames between steps). So a segment's
    caption is decided by its frames and the one before them.
    """
    start = tr.event_frames[0]
    if tr.event == "moves":
        steps = [t for t in range(max(lo, 1), hi + 1) if (tr.x0[t], tr.y0[t]) != (tr.x0[t - 1], tr.y0[t - 1])]
        return f"the {tr.name(start)} moves {tr.direction} ." if steps else None
    if not lo <= start <= hi:
        return None
    if tr.event == "changes":
        return f"the {tr.shape} turns {tr.colours[-1]} ."
    if tr.event == "appears":
        return f"{article(tr.colours[0])} {tr.name()} appears ."
    if tr.event == "disappears":
        return f"the {tr.name()} disappears ."
    return None


def video_caption(tracks: list[Track], texture: str) -> str:
    """The whole clip: what is there at the start, then every event in order; longer for busier clips."""
    present = [f"{article(tr.colours[0])} {tr.name()}" for tr in tracks if tr.visible[0]]
    scene = f"{list_phrase(present)} on a {texture} background ." if present else f"a {texture} background ."
    events = sorted((tr.event_frames[0], _happening(tr, 0, NUM_FRAMES - 1)) for tr in tracks if tr.event)
    return " ".join([scene, *(text for _, text in events if text)])


def segment_captions(tracks: list[Track]) -> list[dict]:
    """Captions of consecutive 4-frame segments, each against the frame before it (see :func:`_happening`):
    ``nothing happens .`` for a static one."""
    out = []
    for lo in range(0, NUM_FRAMES, SEGMENT_FRAMES):
        hi = lo + SEGMENT_FRAMES - 1
        texts = [h for tr in tracks if (h := _happening(tr, lo, hi))]
        out.append({"frames": [lo, hi], "caption": " ".join(texts) if texts else "nothing happens ."})
    return out


def generate_video(rng: np.random.Generator, category: str, sample_id: str):
    """One video sample; returns ``(Sample, object_maps, tracks, number of referents)``."""
    tracks, question, answer, referents = build_video(rng, category)
    texture = str(rng.choice(TEXTURES))
    frames, maps = render_video(rng, tracks, texture)
    regions = []
    for i in range(referents):
        tr = tracks[i]
        regions.append({
            "object": i, "role": "AB"[i], "shape": tr.shape, "event": tr.event,
            "frames": [t for t in range(NUM_FRAMES) if tr.visible[t]],
            "boxes": [list(tr.box(t)) for t in range(NUM_FRAMES) if tr.visible[t]],
        })
    meta = {
        "category": category,
        "texture": texture,
        "objects": [{"shape": tr.shape, "colours": list(tr.colours), "event": tr.event,
                     "event_frames": list(tr.event_frames), "direction": tr.direction,
                     "visible": tr.visible.tolist(), "boxes": [list(tr.box(t)) for t in range(NUM_FRAMES)]}
                    for tr in tracks],
        "regions": regions,
        "caption": video_caption(tracks, texture),
        "segment_captions": segment_captions(tracks),
    }
    sample = Sample(id=sample_id, task="synthetic/video", modality="video", question=question, answer=answer,
                    video=frames, meta=meta)
    return sample, maps, tracks, referents


def ask_more_video(rng: np.random.Generator, tracks: list[Track]) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """Further questions about a video (for training): ``(category, question, answer, referents)`` tuples."""
    out: list[tuple[str, str, str, tuple[int, ...]]] = []
    for i, tr in enumerate(tracks):
        if tr.event is None:
            continue
        out.append(("event", f"what happens to the {tr.shape} ?", tr.event, (i,)))
        if tr.event == "moves":
            out.append(("motion", f"which way does the {tr.name(0)} move ?", str(tr.direction), (i,)))
        elif tr.event == "changes":
            out.append(("change", f"what colour does the {tr.shape} turn ?", tr.colours[-1], (i,)))
    appearing = [i for i, tr in enumerate(tracks) if tr.event == "appears"]
    for i in appearing:
        for j in appearing:
            if i < j and abs(tracks[i].event_frames[0] - tracks[j].event_frames[0]) >= 3:
                a, b = (i, j) if rng.random() < 0.5 else (j, i)
                first = min((i, j), key=lambda k: tracks[k].event_frames[0])
                out.append(("order", f"which appears first , the {tracks[a].shape} or the {tracks[b].shape} ?",
                            tracks[first].shape, (i, j)))
    order = rng.permutation(len(out))
    return [out[k] for k in order]
