"""Document pages: large near-uniform or repetitive areas and a few small content blocks.

A 336x336 page (read as a 168-px thumbnail plus a 2x2 grid of 168-px crops by LLaVA-OneVision's anyres)
has blank margins, paragraphs of grey "text lines", sometimes a ruled grid, and 2-4 boxes: a tinted
rectangle with a coloured frame holding a string of 1-4 small dark glyphs. Boxes and glyphs sit on the
14-px cell grid of the models' patches: a box is ``k + 2`` cells wide and 3 cells high, each glyph
(10-12 px) is centred in its own cell, so a glyph is one visual token at full resolution (and a quarter of
one in the thumbnail). A box never straddles two crops, so every crop and its caption are self-contained.
Questions ask about one box: the glyph in a box of a given colour, the colour of the box holding a glyph,
how many symbols a box holds, its first symbol, whether it holds a given symbol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tokenreduce.eval.sample import Sample

from .render import boxes_overlap, jittered_colour, paste, shape_coverage, to_uint8
from .scenes import article, list_phrase
from .vocab import COLOUR_NAMES, NUMBER_WORDS, SHAPES

PAGE_SIZE = 336
CROP_SIZE = 168
DOCUMENT_CATEGORIES: tuple[str, ...] = ("shape", "colour", "count", "first", "presence")
MAX_SYMBOLS = 4
CELL = 14  # the models' patch size
FRAME = 3  # frame line width, drawn INSET px inside the box's outer cells
INSET = 4
MIN_GLYPH, MAX_GLYPH = 10, 12


@dataclass
class Glyph:
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)


@dataclass
class Block:
    """A framed box of ``colour`` holding a left-to-right string of glyphs."""

    colour: str
    x0: int
    y0: int
    width: int
    height: int
    glyphs: list[Glyph] = field(default_factory=list)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x0 + self.width, self.y0 + self.height)

    def describe(self) -> str:
        if len(self.glyphs) == 1:
            shape = self.glyphs[0].shape
            return f"{article(self.colour)} {self.colour} box holding {article(shape)} {shape}"
        names = " ".join(g.shape for g in self.glyphs)
        return f"{article(self.colour)} {self.colour} box holding {NUMBER_WORDS[len(self.glyphs)]} symbols : {names}"


def _place_blocks(rng: np.random.Generator, strings: list[tuple[str, list[str]]], margin: int) -> list[Block] | None:
    """Boxes on the cell grid inside one crop each (never across the crop lines), one free cell apart."""
    blocks: list[Block] = []
    crop_cells = CROP_SIZE // CELL
    margin_cells = -(-margin // CELL)
    for colour, shapes in strings:
        width, height = len(shapes) + 2, 3
        for _ in range(200):
            crop_x, crop_y = (int(v) for v in rng.integers(0, 2, size=2))
            lo_x = max(margin_cells, crop_x * crop_cells)
            hi_x = min(PAGE_SIZE // CELL - margin_cells, (crop_x + 1) * crop_cells) - width
            lo_y = max(margin_cells, crop_y * crop_cells)
            hi_y = min(PAGE_SIZE // CELL - margin_cells, (crop_y + 1) * crop_cells) - height
            if hi_x < lo_x or hi_y < lo_y:
                continue
            cx, cy = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
            block = Block(colour, cx * CELL, cy * CELL, width * CELL, height * CELL)
            if any(boxes_overlap(block.box, b.box, CELL) for b in blocks):
                continue
            for j, shape in enumerate(shapes):
                size = int(rng.integers(MIN_GLYPH, MAX_GLYPH + 1))
                offset = (CELL - size) // 2
                block.glyphs.append(Glyph(shape, (cx + 1 + j) * CELL + offset, (cy + 1) * CELL + offset, size))
            blocks.append(block)
            break
        else:
            return None
    return blocks


def _string(rng: np.random.Generator, k: int, exclude: set[str] = frozenset()) -> list[str]:
    """``k`` distinct glyph shapes (so a string's first and last symbols differ)."""
    pool = [s for s in SHAPES if s not in exclude]
    return [str(s) for s in rng.choice(pool, size=k, replace=False)]


def build_document(rng: np.random.Generator, category: str):
    """Blocks (the target first) and ``(question, answer)`` for ``category``, answers drawn uniformly."""
    for _ in range(100):
        n_blocks = int(rng.integers(2, 5))
        colours = [str(c) for c in rng.choice(COLOUR_NAMES, size=n_blocks, replace=False)]
        target = colours[0]
        if category == "shape":
            strings = [(target, _string(rng, 1))]
            text = f"what shape is in the {target} box ?"
        elif category == "colour":
            shape = _string(rng, 1)
            strings = [(target, shape)]
            text = f"what colour is the box with the {shape[0]} ?"
        elif category == "count":
            k = int(rng.integers(1, MAX_SYMBOLS + 1))
            strings = [(target, _string(rng, k))]
            text = f"how many symbols are in the {target} box ?"
        elif category == "first":
            strings = [(target, _string(rng, int(rng.integers(2, MAX_SYMBOLS + 1))))]
            text = f"what is the first symbol in the {target} box ?"
        elif category == "presence":
            string = _string(rng, int(rng.integers(2, MAX_SYMBOLS + 1)))
            present = rng.random() < 0.5
            asked = string[int(rng.integers(len(string)))] if present else _string(rng, 1, set(string))[0]
            strings = [(target, string)]
            text = f"is there {article(asked)} {asked} in the {target} box ?"
        else:
            raise ValueError(f"unknown document category {category!r}; known: {DOCUMENT_CATEGORIES}")
        exclude = set(strings[0][1]) if category == "colour" else set()
        for n, colour in enumerate(colours[1:]):
            k = int(rng.integers(1, MAX_SYMBOLS + 1))
            string = _string(rng, min(k, len(SHAPES) - len(exclude)), exclude)
            if category == "presence" and n == 0 and asked not in strings[0][1] and asked not in string:
                string[0] = asked  # the asked symbol elsewhere on the page: the box colour matters
            strings.append((colour, string))
        margin = int(rng.integers(14, 27))
        blocks = _place_blocks(rng, strings, margin)
        if blocks is None:
            continue
        first = blocks[0]
        answer = {
            "shape": first.glyphs[0].shape,
            "colour": first.colour,
            "count": str(len(first.glyphs)),
            "first": first.glyphs[0].shape,
            "presence": "yes" if category == "presence" and asked in strings[0][1] else "no",
        }[category]
        return blocks, margin, text, answer
    raise RuntimeError(f"could not build a {category!r} document")  # pragma: no cover - never seen


def _paper(rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(232, 250)
    page = np.full((PAGE_SIZE, PAGE_SIZE, 3), level, np.float32) + rng.uniform(-4, 4, size=3).astype(np.float32)
    return page + rng.normal(0, 1.5, size=(PAGE_SIZE, PAGE_SIZE, 1)).astype(np.float32)


def _text_lines(rng: np.random.Generator, page: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> list[list[int]]:
    """Paragraph of grey word bars between ``x0..x1``, ``y0..y1``; returns the boxes of its lines."""
    pitch = int(rng.integers(10, 14))
    bar = int(rng.integers(3, 6))
    ink = rng.uniform(95, 150)
    lines = []
    y = y0
    while y + bar <= y1:
        x = x0 + (int(rng.integers(8, 20)) if rng.random() < 0.15 else 0)
        end = x1 - (int(rng.integers(0, (x1 - x0) // 2)) if rng.random() < 0.25 else 0)
        while x < end:
            word = int(rng.integers(6, 30))
            page[y : y + bar, x : min(x + word, end)] = ink + rng.uniform(-8, 8)
            x += word + int(rng.integers(4, 7))
        lines.append([x0, y, end, y + bar])
        y += pitch
    return lines


def _ruled_grid(rng: np.random.Generator, page: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> None:
    """A repetitive table pattern of light lines."""
    step_y, step_x = int(rng.integers(10, 16)), int(rng.integers(18, 34))
    tone = rng.uniform(170, 205)
    page[y0:y1:step_y, x0:x1] = tone
    page[y0:y1, x0:x1:step_x] = tone


def render_document(rng: np.random.Generator, blocks: list[Block], margin: int):
    """Pixels, the block and glyph index maps (int16, -1 elsewhere) and the page's filler parts."""
    page = _paper(rng)
    top, bottom, left, right = margin, PAGE_SIZE - margin, margin, PAGE_SIZE - margin
    parts: list[dict] = []
    y = top
    while y < bottom - 12:
        height = int(rng.integers(30, 110))
        y_end = min(bottom, y + height)
        kind = rng.choice(["text", "text", "text", "blank", "grid"])
        if kind == "text":
            two_columns = rng.random() < 0.3
            spans = [(left, PAGE_SIZE // 2 - 8), (PAGE_SIZE // 2 + 8, right)] if two_columns else [(left, right)]
            for xa, xb in spans:
                _text_lines(rng, page, xa, xb, y, y_end)
        elif kind == "grid":
            _ruled_grid(rng, page, left, right, y, y_end)
        parts.append({"kind": str(kind), "box": [left, y, right, y_end]})
        y = y_end + int(rng.integers(8, 20))
    block_map = np.full((PAGE_SIZE, PAGE_SIZE), -1, np.int16)
    glyph_map = np.full((PAGE_SIZE, PAGE_SIZE), -1, np.int16)
    glyph_index = 0
    for b, block in enumerate(blocks):
        x0, y0, x1, y1 = block.box
        paper = rng.uniform(240, 250)
        page[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = paper
        frame = jittered_colour(rng, block.colour, 14)
        page[y0:y1, x0:x1] = 0.75 * paper + 0.25 * frame  # tinted: the colour is visible in every cell
        fx0, fy0, fx1, fy1 = x0 + INSET, y0 + INSET, x1 - INSET, y1 - INSET
        page[fy0:fy1, fx0 : fx0 + FRAME] = frame
        page[fy0:fy1, fx1 - FRAME : fx1] = frame
        page[fy0 : fy0 + FRAME, fx0:fx1] = frame
        page[fy1 - FRAME : fy1, fx0:fx1] = frame
        block_map[y0:y1, x0:x1] = b
        ink = np.full(3, rng.uniform(20, 55), np.float32)
        for g in block.glyphs:
            paste(page, shape_coverage(g.shape, g.size), ink, g.x0, g.y0, glyph_map, glyph_index)
            glyph_index += 1
    return to_uint8(page), block_map, glyph_map, parts


def _fillers(parts: list[dict], box: tuple[int, int, int, int]) -> list[str]:
    kinds = {p["kind"] for p in parts if boxes_overlap(tuple(p["box"]), box)}
    out = []
    if "text" in kinds:
        out.append("text lines")
    if "grid" in kinds:
        out.append("a ruled grid")
    return out


def document_caption(blocks: list[Block], parts: list[dict], box=(0, 0, PAGE_SIZE, PAGE_SIZE), page=True) -> str:
    """Caption of the page (or of one crop): its filler and every box inside, longer for busier regions."""
    inside = [b for b in blocks if b.x0 >= box[0] and b.y0 >= box[1] and b.x0 < box[2] and b.y0 < box[3]]
    things = _fillers(parts, box) + [b.describe() for b in sorted(inside, key=lambda b: (b.y0, b.x0))]
    if not things:
        return "a blank page ." if page else "blank margin ."
    prefix = "a page with " if page else ""
    return f"{prefix}{list_phrase(things)} ."


def answer_glyph_indices(category: str, question: str, block: Block) -> list[int]:
    """Indices of the glyphs of ``block`` the answer is read from (all of them for a count)."""
    shapes = [g.shape for g in block.glyphs]
    if category == "count":
        return list(range(len(shapes)))
    if category == "presence":
        asked = next(s for s in SHAPES if f" {s} in the" in question)
        return [shapes.index(asked)] if asked in shapes else []
    return [0]


def generate_document(rng: np.random.Generator, category: str, sample_id: str):
    """One document sample; returns ``(Sample, block_map, glyph_map, blocks)``."""
    blocks, margin, question, answer = build_document(rng, category)
    pixels, block_map, glyph_map, parts = render_document(rng, blocks, margin)
    target = blocks[0]
    answer_glyphs = answer_glyph_indices(category, question, target)
    regions = [{"box": list(target.box), "block": 0, "role": "A", "colour": target.colour}]
    regions += [{"box": list(g.box), "block": 0, "role": "answer" if i in answer_glyphs else "glyph",
                 "shape": g.shape, "order": i} for i, g in enumerate(target.glyphs)]
    crops = []
    for cy in range(PAGE_SIZE // CROP_SIZE):
        for cx in range(PAGE_SIZE // CROP_SIZE):
            box = (cx * CROP_SIZE, cy * CROP_SIZE, (cx + 1) * CROP_SIZE, (cy + 1) * CROP_SIZE)
            crops.append({"box": list(box), "caption": document_caption(blocks, parts, box, page=False)})
    meta = {
        "category": category,
        "blocks": [{"colour": b.colour, "box": list(b.box), "symbols": [g.shape for g in b.glyphs],
                    "symbol_boxes": [list(g.box) for g in b.glyphs]} for b in blocks],
        "parts": parts,
        "regions": regions,
        "caption": document_caption(blocks, parts),
        "crop_captions": crops,
    }
    sample = Sample(id=sample_id, task="synthetic/document", modality="image", question=question, answer=answer,
                    images=[Image.fromarray(pixels)], meta=meta)
    return sample, block_map, glyph_map, blocks


def ask_more_document(rng: np.random.Generator, blocks: list[Block]) -> list[tuple[str, str, str, int, list[int]]]:
    """Further questions about a page (for training).

    Tuples ``(category, question, answer, block index, indices of the glyphs of that block the answer is
    read from)``.
    """
    all_shapes = [g.shape for b in blocks for g in b.glyphs]
    out: list[tuple[str, str, str, int, list[int]]] = []
    for i, b in enumerate(blocks):
        shapes = [g.shape for g in b.glyphs]
        out.append(("count", f"how many symbols are in the {b.colour} box ?", str(len(shapes)), i,
                    list(range(len(shapes)))))
        if len(shapes) == 1:
            out.append(("shape", f"what shape is in the {b.colour} box ?", shapes[0], i, [0]))
            if all_shapes.count(shapes[0]) == 1:
                out.append(("colour", f"what colour is the box with the {shapes[0]} ?", b.colour, i, [0]))
        else:
            out.append(("first", f"what is the first symbol in the {b.colour} box ?", shapes[0], i, [0]))
            asked = str(rng.choice(SHAPES))
            found = [shapes.index(asked)] if asked in shapes else []
            out.append(("presence", f"is there {article(asked)} {asked} in the {b.colour} box ?",
                        "yes" if found else "no", i, found))
    order = rng.permutation(len(out))
    return [out[j] for j in order]
