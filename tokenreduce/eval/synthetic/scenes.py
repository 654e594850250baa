"""Image scenes: a few coloured shapes on a textured background, and questions about a few of them.

A 224x224 scene holds 2-7 shapes of 22-34 px (two or three 14-px patches across) on one of five textures;
together the shapes cover about a tenth of the image, so most visual tokens are background. Every question
(colour of a shape, shape of a colour, count, presence of a colour-shape pair, relative position of two
shapes) depends on one to four of them. A scene is built backwards from its question: the category and
the answer are drawn first, then a layout that makes the answer true, so answers are balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from tokenreduce.eval.sample import Sample

from .render import background, boxes_overlap, jittered_colour, paste, shape_coverage, to_uint8
from .vocab import COLOUR_NAMES, PLURALS, SHAPES, TEXTURES

IMAGE_SIZE = 224
IMAGE_CATEGORIES: tuple[str, ...] = ("colour", "shape", "count", "presence", "position")
MIN_OBJECT, MAX_OBJECT = 24, 28
CELL = 14  # the models' patch size: objects are centred in blocks of 2x2 cells
BLOCK = 2 * CELL
MAX_COUNT = 4
POSITION_MARGIN = 3 * CELL


@dataclass
class SceneObject:
    """One shape of a scene: attributes and the top-left corner of its ``size x size`` box."""

    colour: str
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` with exclusive ends, in pixels."""
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"

    def with_article(self) -> str:
        return f"{article(self.colour)} {self.describe()}"


@dataclass
class Question:
    """A question about a scene, its answer, and the objects it depends on with their roles."""

    category: str
    text: str
    answer: str
    evidence: dict[int, str]  # object index -> role: "A" (main referent), "B" (second referent), "evidence"


def article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[0] in "aeiou" else "a"


def sample_size(rng: np.random.Generator, low: int = MIN_OBJECT, high: int = MAX_OBJECT) -> int:
    return int(rng.integers(low, high + 1))


def place_objects(
    rng: np.random.Generator, specs: list[tuple[str, str]], canvas: int, placed: list[SceneObject] | None = None,
    low: int = MIN_OBJECT, high: int = MAX_OBJECT, tries: int = 200,
) -> list[SceneObject] | None:
    """Place ``specs`` (colour, shape) after ``placed``, each centred in its own block of 2x2 cells with at
    least one free cell between blocks; None if it fails.

    Centring shapes on the 14-px cell grid makes each cell hold one quarter of one shape, always the same
    quarter for a given shape: unaligned shapes of this size split into fragments that a tiny vision tower
    cannot learn to tell apart in minutes of CPU time (measured: chance-level per-patch shape after 300
    steps, while aligned quarters are learnt).
    """
    out = list(placed or [])
    cells = canvas // CELL
    for colour, shape in specs:
        for _ in range(tries):
            size = sample_size(rng, low, high)
            bx, by = (int(v) for v in rng.integers(0, cells - 1, size=2))
            offset = (BLOCK - size) // 2
            obj = SceneObject(colour, shape, bx * CELL + offset, by * CELL + offset, size)
            block = (bx * CELL, by * CELL, bx * CELL + BLOCK, by * CELL + BLOCK)
            if not any(boxes_overlap(block, _block(o), CELL) for o in out):
                out.append(obj)
                break
        else:
            return None
    return out


def _block(obj: SceneObject) -> tuple[int, int, int, int]:
    x0, y0 = obj.x0 // CELL * CELL, obj.y0 // CELL * CELL
    return (x0, y0, x0 + BLOCK, y0 + BLOCK)


def _other(rng: np.random.Generator, values: tuple[str, ...], exclude: set[str]) -> str:
    return str(rng.choice([v for v in values if v not in exclude]))


def _distractors(
    rng: np.random.Generator, n: int, forbidden_pairs: set[tuple[str, str]] = frozenset(),
    forbidden_colours: set[str] = frozenset(), forbidden_shapes: set[str] = frozenset(),
) -> list[tuple[str, str]]:
    """``n`` random (colour, shape) pairs avoiding the given colours, shapes and pairs.

    Colours and shapes are drawn from a small per-scene subset so that repeats (and counts above one) occur.
    """
    colours = [c for c in COLOUR_NAMES if c not in forbidden_colours]
    shapes = [s for s in SHAPES if s not in forbidden_shapes]
    colours = list(rng.choice(colours, size=min(len(colours), int(rng.integers(2, 5))), replace=False))
    shapes = list(rng.choice(shapes, size=min(len(shapes), int(rng.integers(2, 5))), replace=False))
    out = []
    while len(out) < n:
        pair = (str(rng.choice(colours)), str(rng.choice(shapes)))
        if pair not in forbidden_pairs:
            out.append(pair)
    return out


def build_layout(rng: np.random.Generator, category: str, canvas: int = IMAGE_SIZE):
    """A layout and a question of ``category`` whose answer it makes true (answers drawn uniformly)."""
    for _ in range(100):
        result = _try_layout(rng, category, canvas)
        if result is not None:
            return result
    raise RuntimeError(f"could not build a {category!r} scene")  # pragma: no cover - never seen


def _try_layout(rng: np.random.Generator, category: str, canvas: int):
    if category == "colour":
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(COLOUR_NAMES))
        others = _distractors(rng, int(rng.integers(1, 6)), forbidden_shapes={shape})
        objects = place_objects(rng, [(colour, shape), *others], canvas)
        if objects is None:
            return None
        q = Question(category, f"what colour is the {shape} ?", colour, {0: "A"})
    elif category == "shape":
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(COLOUR_NAMES))
        others = _distractors(rng, int(rng.integers(1, 6)), forbidden_colours={colour})
        objects = place_objects(rng, [(colour, shape), *others], canvas)
        if objects is None:
            return None
        q = Question(category, f"what shape is the {colour} object ?", shape, {0: "A"})
    elif category == "count":
        k = int(rng.integers(0, MAX_COUNT + 1))
        n_other = int(rng.integers(max(0, 2 - k), 7 - k))
        by_colour = rng.random() < 0.5
        if by_colour:
            colour = str(rng.choice(COLOUR_NAMES))
            targets = [(colour, str(rng.choice(SHAPES))) for _ in range(k)]
            others = _distractors(rng, n_other, forbidden_colours={colour})
            text = f"how many {colour} objects are there ?"
        else:
            shape = str(rng.choice(SHAPES))
            targets = [(str(rng.choice(COLOUR_NAMES)), shape) for _ in range(k)]
            others = _distractors(rng, n_other, forbidden_shapes={shape})
            text = f"how many {PLURALS[shape]} are there ?"
        objects = place_objects(rng, targets + others, canvas)
        if objects is None:
            return None
        q = Question(category, text, str(k), {i: "A" for i in range(k)})
    elif category == "presence":
        colour, shape = str(rng.choice(COLOUR_NAMES)), str(rng.choice(SHAPES))
        present = rng.random() < 0.5
        specs: list[tuple[str, str]] = [(colour, shape)] if present else []
        # Near misses make the pair matter: the colour on another shape, the shape in another colour.
        if rng.random() < 0.8:
            specs.append((colour, _other(rng, SHAPES, {shape})))
        if rng.random() < 0.8:
            specs.append((_other(rng, COLOUR_NAMES, {colour}), shape))
        specs += _distractors(rng, int(rng.integers(max(0, 3 - len(specs)), 7 - len(specs))),
                              forbidden_pairs={(colour, shape)})
        objects = place_objects(rng, specs, canvas)
        if objects is None:
            return None
        evidence = {i: ("A" if o.colour == colour and o.shape == shape else "evidence")
                    for i, o in enumerate(objects) if o.colour == colour or o.shape == shape}
        q = Question(category, f"is there {article(colour)} {colour} {shape} ?", "yes" if present else "no", evidence)
    elif category == "position":
        first = (str(rng.choice(COLOUR_NAMES)), str(rng.choice(SHAPES)))
        second = (_other(rng, COLOUR_NAMES, {first[0]}), _other(rng, SHAPES, {first[1]}))
        horizontal = rng.random() < 0.5
        objects = place_objects(rng, [first, second], canvas)
        if objects is None:
            return None
        a, b = objects
        axis = 0 if horizontal else 1
        delta = a.centre[axis] - b.centre[axis]
        if abs(delta) < POSITION_MARGIN:
            return None
        others = _distractors(rng, int(rng.integers(1, 5)), forbidden_pairs={first, second})
        objects = place_objects(rng, others, canvas, placed=objects)
        if objects is None:
            return None
        if horizontal:
            text = f"is the {a.describe()} left or right of the {b.describe()} ?"
            answer = "left" if delta < 0 else "right"
        else:
            text = f"is the {a.describe()} above or below the {b.describe()} ?"
            answer = "above" if delta < 0 else "below"
        q = Question(category, text, answer, {0: "A", 1: "B"})
    else:
        raise ValueError(f"unknown image category {category!r}; known: {IMAGE_CATEGORIES}")
    return objects, q


def ask_more(rng: np.random.Generator, objects: list[SceneObject], canvas: int = IMAGE_SIZE) -> list[Question]:
    """Extra questions about an existing layout, one per category that it supports (for training)."""
    out: list[Question] = []
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    unique_shape = [i for i, o in enumerate(objects) if shapes.count(o.shape) == 1]
    unique_colour = [i for i, o in enumerate(objects) if colours.count(o.colour) == 1]
    if unique_shape:
        i = int(rng.choice(unique_shape))
        out.append(Question("colour", f"what colour is the {objects[i].shape} ?", objects[i].colour, {i: "A"}))
    if unique_colour:
        i = int(rng.choice(unique_colour))
        out.append(Question("shape", f"what shape is the {objects[i].colour} object ?", objects[i].shape, {i: "A"}))
    if rng.random() < 0.5:
        colour = str(rng.choice(COLOUR_NAMES))
        idx = [i for i, c in enumerate(colours) if c == colour]
        text = f"how many {colour} objects are there ?"
    else:
        shape = str(rng.choice(SHAPES))
        idx = [i for i, s in enumerate(shapes) if s == shape]
        text = f"how many {PLURALS[shape]} are there ?"
    if len(idx) <= MAX_COUNT:
        out.append(Question("count", text, str(len(idx)), dict.fromkeys(idx, "A")))
    pairs = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        colour, shape = objects[int(rng.integers(len(objects)))].colour, objects[int(rng.integers(len(objects)))].shape
    else:
        colour, shape = str(rng.choice(COLOUR_NAMES)), str(rng.choice(SHAPES))
    evidence = {i: ("A" if (o.colour, o.shape) == (colour, shape) else "evidence")
                for i, o in enumerate(objects) if o.colour == colour or o.shape == shape}
    out.append(Question("presence", f"is there {article(colour)} {colour} {shape} ?", "yes" if (colour, shape) in pairs else "no",
                        evidence))
    unique_pair = [i for i, o in enumerate(objects) if [(p.colour, p.shape) for p in objects].count((o.colour, o.shape)) == 1]
    candidates = [(i, j) for i in unique_pair for j in unique_pair
                  if i != j and objects[i].colour != objects[j].colour and objects[i].shape != objects[j].shape]
    if candidates:
        i, j = candidates[int(rng.integers(len(candidates)))]
        a, b = objects[i], objects[j]
        dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
        if abs(dx) >= POSITION_MARGIN and (abs(dy) < POSITION_MARGIN or rng.random() < 0.5):
            text = f"is the {a.describe()} left or right of the {b.describe()} ?"
            out.append(Question("position", text, "left" if dx < 0 else "right", {i: "A", j: "B"}))
        elif abs(dy) >= POSITION_MARGIN:
            text = f"is the {a.describe()} above or below the {b.describe()} ?"
            out.append(Question("position", text, "above" if dy < 0 else "below", {i: "A", j: "B"}))
    return out


def render_scene(
    rng: np.random.Generator, objects: list[SceneObject], texture: str, canvas: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (uint8 ``[H, W, 3]``) and the object index map (int16, -1 for background) of a layout."""
    pixels = background(rng, canvas, canvas, texture)
    object_map = np.full((canvas, canvas), -1, dtype=np.int16)
    for i, o in enumerate(objects):
        paste(pixels, shape_coverage(o.shape, o.size), jittered_colour(rng, o.colour), o.x0, o.y0, object_map, i)
    return to_uint8(pixels), object_map


def _reading_order(objects: list[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: (round(o.centre[1] / 56), o.centre[0]))


def list_phrase(items: list[str]) -> str:
    """``"a , b and c"`` (tokens separated by spaces)."""
    if len(items) <= 1:
        return "".join(items)
    return " , ".join(items[:-1]) + " and " + items[-1]


def scene_caption(objects: list[SceneObject], texture: str) -> str:
    """Caption listing every shape, so its length grows with the number of shapes."""
    if not objects:
        return f"a {texture} background ."
    names = [o.with_article() for o in _reading_order(objects)]
    return f"{list_phrase(names)} on a {texture} background ."


def crop_captions(objects: list[SceneObject], texture: str, canvas: int = IMAGE_SIZE) -> list[dict]:
    """Captions of the four quadrants; a shape belongs to the quadrant holding its centre."""
    half = canvas // 2
    out = []
    for y0 in (0, half):
        for x0 in (0, half):
            inside = [o for o in objects if x0 <= o.centre[0] < x0 + half and y0 <= o.centre[1] < y0 + half]
            out.append({"box": [x0, y0, x0 + half, y0 + half], "caption": scene_caption(inside, texture)})
    return out


def generate_image(
    rng: np.random.Generator, category: str, sample_id: str, extra_questions: bool = False,
):
    """One image sample of ``category``; returns ``(Sample, object_map, objects, questions)``.

    ``questions`` holds the sample's question first, then (with ``extra_questions``) more questions about the
    same layout, which training uses to get several questions per encoded image.
    """
    objects, question = build_layout(rng, category)
    texture = str(rng.choice(TEXTURES))
    pixels, object_map = render_scene(rng, objects, texture)
    questions = [question, *(ask_more(rng, objects) if extra_questions else [])]
    regions = [
        {"box": list(objects[i].box), "object": i, "role": role, "colour": objects[i].colour,
         "shape": objects[i].shape}
        for i, role in sorted(question.evidence.items())
    ]
    meta = {
        "category": category,
        "texture": texture,
        "objects": [{"colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in objects],
        "regions": regions,
        "caption": scene_caption(objects, texture),
        "crop_captions": crop_captions(objects, texture),
    }
    sample = Sample(id=sample_id, task="synthetic/image", modality="image", question=question.text,
                    answer=question.answer, images=[Image.fromarray(pixels)], meta=meta)
    return sample, object_map, objects, questions
