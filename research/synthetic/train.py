"""Train the shipped tiny VLMs on the synthetic benchmark's train split (CPU, seeded, deterministic).

    python -m research.synthetic.train image      # or: document, video
    python -m research.synthetic.train image --out /tmp/m --lm-steps 200  # smoke run

Each kind runs its whole recipe in one command: the tower, then the language phases of its recipe (``recipes/<kind>.json``; a
curriculum phase, then shorter ones on all tokens with weak categories weighted up), each continuing from the
one before on the same cached pools. ``video`` starts its language model from the image model's and
``document`` from the video model's (train those first); ``document`` first trains its projector alone. Any
schedule option on the command line (``--lm-steps``, ``--lm-lr``, ``--curriculum``, ``--warmup``,
``--token-drop``, ``--category-weights``) or ``--init`` makes the run a single phase.

Two stages, because training end to end from random init stalls near chance (an earlier trial: 37% after
35 minutes, projected image features drifting to ~800x the norm of text embeddings):

1. **Tower.** The vision tower alone, with linear heads on the visual features the LM will read
   (``hidden_states[vision_feature_layer]``) and per-patch labels the generator gives for free: colour and
   shape of the object covering each patch, whether it holds an object's centre, and its row / column
   (documents: box colour, glyph present, glyph shape).
2. **Language.** Tower frozen and its features cached; projector, language model (and OneVision's
   ``image_newline``) trained on the questions, placed BEFORE the visual tokens exactly as
   :func:`~.prompting.prompt` writes them, with the answer + EOS loss plus an auxiliary loss: a linear probe
   on a middle layer's hidden state of every visual token must say whether the token belongs to what the
   question refers to (first referent / second referent / neither), and a supervised readout: at the answer
   position, chosen heads of the last layer must put their attention on the referents (see ``READOUTS``).
   The heads and the probe are dropped.

**Distractor curriculum.** With all 256+ visual tokens from the first step the LM sat at chance for 500+
steps (26% at step 250, 34% at 500, colour questions at 1/7), although the cached features are linearly
perfect (a linear probe reads colour and shape from the referent patches at 100%) and an LM shown only the
referent tokens fits colour questions in 200 steps: the softmax over hundreds of look-alike background
tokens starves the readout of gradient. So each question first sees all of its referent tokens plus a
random subset of the others, at their ORIGINAL positions (so nothing changes when all are shown), the subset
growing quadratically to every token over the first ``curriculum`` (60%) of the steps. Answers stay valid:
only tokens of objects the question does not ask about are dropped. ``--init DIR`` continues from a saved
run (e.g. with ``--curriculum 0 --category-weights position=5``); the model is saved at every validation,
so a stopped run can be continued too.

**Videos need two more things.** (a) The curriculum must not show WHICH tokens belong to the referent:
showing the referent's own tokens lets the LM read motion and timing off the pattern of shown positions
(train answer loss 0.2-0.4, validation at chance, 20% at step 500). Videos show the whole row and column
through each referent in every frame instead (``Question.focus``). (b) The answer depends on WHEN, so the
readout and probe roles are temporal: role 2 = the referent as in the first frame, role 1 = as in the last
(for "order": the first object while it is alone, and the other one); heads 0 / 1 read them, heads 2 / 3
measure whether each is there (an appearing object has no initial state, a disappearing one no final).

Images get several questions per generated scene, pages several per page, videos several per video, so
each cached tower output is reused. At the end the model and processor are saved with ``save_pretrained``
and re-checked through the real path (processor, ``generate``) on validation samples, full tokens and
``random`` at 10%. Timing and accuracies go to ``training_summary.json`` next to the weights.

Timing, findings and every run behind the recipes: ``research/RESULTS.md``; the recipes themselves:
``research/synthetic/recipes/<kind>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.eval.synthetic.benchmark import generate
from tokenreduce.eval.synthetic.documents import CROP_SIZE, PAGE_SIZE, answer_glyph_indices, ask_more_document
from tokenreduce.eval.synthetic.models import (
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    build_model,
    build_processor,
    build_tokenizer,
    model_dir,
)
from tokenreduce.eval.synthetic.prompting import prompt
from tokenreduce.eval.synthetic.scenes import IMAGE_SIZE
from tokenreduce.eval.synthetic.videos import FRAME_SIZE, NUM_FRAMES, ask_more_video
from tokenreduce.eval.synthetic.vocab import COLOUR_NAMES, SHAPES

IGNORE = -100


@dataclass
class Plan:
    """Hyperparameters of one model's training (step counts fixed, so runs are deterministic)."""

    tower_pool: int
    tower_steps: int
    tower_batch: int  # tower units (images, crops or frames) per step
    lm_pool: int
    lm_steps: int
    lm_batch: int
    tower_lr: float = 2e-3
    lm_lr: float = 1.5e-3
    aux_weight: float = 1.0
    readout_weight: float = 1.0
    # Weight of a linear regression of each visual token's (row, col) from the last layer's input, where the
    # readout heads read: without it the projector and LM drop where a token is (research/RESULTS.md).
    grid_weight: float = 0.0
    warmup: int = 100
    curriculum: float = 0.6  # fraction of LM steps over which distractor tokens ramp (quadratically) to all
    # Share of questions that see their referents but only 5-100% of the other visual tokens (original positions).
    token_drop: float = 0.0
    aux_layer: int = 2
    questions_per_media: int = 4
    val_size: int = 300
    eval_every: int = 250
    seed: int = 0
    category_weights: dict[str, float] = field(default_factory=dict)
    # Start the language model and LM head from the model of this kind in model_dir (video: "image").
    language_from: str | None = None
    # False: the language model and LM head stay frozen and only the projector (and OneVision's image_newline)
    # learns, LLaVA's first stage: a borrowed LM is not bent to an untrained projector's features.
    train_language: bool = True
    # Language phases after the first, each continuing from where the one before stopped (same pools).
    then: tuple[Phase, ...] = ()

    def phases(self) -> list[Plan]:
        """The language stage as a list of plans, one per phase, each with its own schedule."""
        plans = [replace(self, then=())]
        for phase in self.then:
            plans.append(replace(plans[-1], lm_steps=phase.steps, lm_lr=phase.lr, warmup=phase.warmup,
                                 curriculum=phase.curriculum, token_drop=phase.token_drop,
                                 train_language=phase.train_language,
                                 category_weights=dict(phase.category_weights or plans[-1].category_weights)))
        return plans


@dataclass(frozen=True)
class Phase:
    """A language phase continuing the previous one: its own steps, warm-up and cosine schedule, weights.

    What worked for the image and video models: a curriculum phase first, then shorter phases on all tokens
    with the weak categories weighted up and the learning rate lowered (runs in research/RESULTS.md).
    """

    steps: int
    lr: float
    warmup: int = 20
    curriculum: float = 0.0
    token_drop: float = 0.0
    category_weights: dict[str, float] | None = None  # None: the previous phase's
    train_language: bool = True  # False: the projector alone (Plan.train_language)


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def load_plan(kind: str) -> Plan:
    """The recipe of ``kind`` from ``recipes/<kind>.json``: :class:`Plan` fields, ``then`` a list of
    :class:`Phase` fields; ``kind``, ``description`` and each phase's ``note`` are for the reader."""
    data = json.loads((RECIPES_DIR / f"{kind}.json").read_text())
    for key in ("kind", "description"):
        data.pop(key, None)
    phases = tuple(Phase(**{k: v for k, v in phase.items() if k != "note"}) for phase in data.pop("then", ()))
    return Plan(**data, then=phases)


PLANS: dict[str, Plan] = {kind: load_plan(kind) for kind in ("image", "document", "video")}


# ----- per-patch labels ------------------------------------------------------------------------------------
def coverage(index_map: np.ndarray, n: int, cell: int) -> np.ndarray:
    """``[n, R, C]``: fraction of each ``cell x cell`` cell covered by index ``i`` of ``index_map``."""
    h, w = index_map.shape
    r, c = h // cell, w // cell
    grid = index_map[: r * cell, : c * cell].reshape(r, cell, c, cell)
    if n == 0:
        return np.zeros((0, r, c), np.float32)
    return np.stack([(grid == i).mean(axis=(1, 3)) for i in range(n)]).astype(np.float32)


def _class_labels(cov: np.ndarray, classes: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per cell: ``classes[i] + 1`` of the best-covering index if covered >= ``high``, 0 if < ``low``, else ignore."""
    r, c = cov.shape[1:]
    if cov.shape[0] == 0:
        return np.zeros((r, c), np.int64)
    best = cov.argmax(0)
    amount = cov.max(0)
    out = np.where(amount >= high, classes[best] + 1, np.where(amount < low, 0, IGNORE))
    return out.astype(np.int64)


def _centre_labels(centres: list[tuple[float, float]], cell: int, r: int, c: int) -> np.ndarray:
    out = np.zeros((r, c), np.int64)
    for x, y in centres:
        row, col = int(y // cell), int(x // cell)
        if 0 <= row < r and 0 <= col < c:
            out[row, col] = 1
    return out


def object_patch_labels(object_map: np.ndarray, colours: list[str], shapes: list[str],
                        centres: list[tuple[float, float]]) -> dict[str, np.ndarray]:
    """Per-patch labels of a scene image or video frame: colour, shape, centre, row, column (each ``[P]``)."""
    cov = coverage(object_map, len(colours), PATCH_SIZE)
    r, c = cov.shape[1:]
    colour_ids = np.array([COLOUR_NAMES.index(x) for x in colours], np.int64)
    shape_ids = np.array([SHAPES.index(x) for x in shapes], np.int64)
    rows, cols = np.mgrid[0:r, 0:c]
    colour = _class_labels(cov, colour_ids, 0.05, 0.25)
    # Shape is learnt on object patches only: background patches (88% of them) would drown its gradient.
    shape = np.where(colour > 0, _class_labels(cov, shape_ids, 0.05, 0.25), IGNORE)
    labels = {
        "colour": colour,
        "shape": shape,
        "centre": _centre_labels(centres, PATCH_SIZE, r, c),
        "row": rows.astype(np.int64),
        "col": cols.astype(np.int64),
    }
    return {k: v.reshape(-1) for k, v in labels.items()}


def document_patch_labels(block_map, glyph_map, blocks, cell: int) -> dict[str, np.ndarray]:
    """Per-cell labels of a page at ``cell`` px (``[R, C]`` each): box colour, glyph present, glyph shape."""
    glyphs = [g for block in blocks for g in block.glyphs]
    block_cov = coverage(block_map, len(blocks), cell)
    glyph_cov = coverage(glyph_map, len(glyphs), cell)
    colours = np.array([COLOUR_NAMES.index(b.colour) for b in blocks], np.int64)
    shapes = np.array([SHAPES.index(g.shape) for g in glyphs], np.int64)
    shape = _class_labels(glyph_cov, shapes, 0.02, 0.1)
    on_glyph = shape > 0
    return {
        "colour": _class_labels(block_cov, colours, 0.05, 0.3),
        "glyph": np.where(on_glyph, 1, np.where(shape == 0, 0, IGNORE)),
        "shape": np.where(on_glyph, shape, IGNORE),
    }


def _roles_to_aux(cov: np.ndarray, roles: dict[int, int], threshold: float) -> np.ndarray:
    """Per cell: the role class (1, 2) of the referent covering it by >= ``threshold``, else 0."""
    out = np.zeros(cov.shape[1:], np.int64)
    for i, role in roles.items():
        out[(cov[i] >= threshold) & (out == 0)] = role
    return out


# ----- tasks: data pools and how features reach the LM --------------------------------------------------------
def normalise(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> the processor's float ``[..., 3, H, W]`` (rescale, mean / std)."""
    x = pixels_uint8.float().div(255.0).movedim(-1, -3)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class Question:
    media: int  # index into the cached features
    ids: list[int]  # question token ids (BOS first)
    answer: int
    aux: np.ndarray  # [num visual tokens] int8 role classes
    category: str
    # [num visual tokens] bool: what the curriculum always shows besides the referents (default: nothing),
    # chosen so that WHICH tokens are shown does not give the answer away (see the module docstring)
    focus: np.ndarray | None = None


# Readout supervision: at the answer position, head ``h`` of the LM's last layer must put its attention on
# the visual tokens of role ``r`` ("max": all of it; "count": K / (K + sink) of it for K such tokens, so the
# head's output measures how many there are). Without it the tiny LM learnt to mark the referents (the
# probe) but not to read them: 43% on images after 1250 steps.
Readout = tuple[int, int, str]
READOUTS: dict[str, dict[str, tuple[Readout, ...]]] = {
    "image": {"colour": ((0, 1, "max"),), "shape": ((0, 1, "max"),), "position": ((0, 1, "max"), (1, 2, "max")),
              "count": ((2, 1, "count"),), "presence": ((2, 1, "count"),)},
    "document": {**{c: ((0, 2, "max"), (2, 2, "max")) for c in ("shape", "colour", "first")},
                 "count": ((2, 2, "count"),), "presence": ((2, 2, "count"),)},
    # videos: role 1 = the referent in its final state (after the event), role 2 = in its initial state; for
    # "order", role 1 = the first object while it is alone, role 2 = the second one (see VideoTask.roles)
    "video": {**{c: ((0, 1, "max"), (1, 2, "max"), (2, 1, "count"), (3, 2, "count")) for c in ("motion", "event")},
              # the new colour also through the other KV head: heads 0 and 1 share one value projection, whose
              # 32 dims carry position and shape (motion, order), and change questions stayed at chance
              # although head 0 put all its attention on the final state and a linear probe read its colour
              "change": ((0, 1, "max"), (1, 2, "max"), (2, 1, "max"), (3, 2, "max")),
              "order": ((0, 1, "max"), (1, 2, "max"))},
}
COUNT_SINK = {"image": 8.0, "document": 2.0, "video": 4.0}


def readout_loss(attentions: torch.Tensor, aux: torch.Tensor, questions: list[Question], kind: str) -> torch.Tensor:
    """Loss of the supervised readout heads; ``attentions`` ``[B, heads, L]`` from the answer position."""
    losses = []
    for row, q in enumerate(questions):
        for head, role, mode in READOUTS[kind].get(q.category, ()):
            targets = aux[row] == role
            k = int(targets.sum())
            mass = attentions[row, head][targets].sum()
            if mode == "max":
                if k:
                    losses.append(-torch.log(mass + 1e-6))
            else:
                wanted = k / (k + COUNT_SINK[kind])
                losses.append((mass - wanted) ** 2 * 10.0)
    return torch.stack(losses).mean() if losses else attentions.sum() * 0.0


class Task:
    """What differs between the families: pools, labels, and packing of visual features."""

    kind: str
    label_classes: ClassVar[dict[str, int]]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def word(self, text: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(text)

    # tower stage
    def tower_units(self, index: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Tower inputs of train sample ``index`` (uint8 ``[U, H, W, 3]`` or float) and per-unit labels."""
        raise NotImplementedError

    def tower_pixels(self, units: torch.Tensor) -> torch.Tensor:
        return normalise(units) if units.dtype == torch.uint8 else units.float()

    # language stage
    def media_and_questions(self, index: int, split: str, rng: np.random.Generator, extra: bool):
        """Tower inputs of one sample plus its questions ``[(ids, answer, aux, category, focus or None)]``."""
        raise NotImplementedError

    def pack(self, model, features: torch.Tensor) -> torch.Tensor:
        """Cached tower features of a batch -> the LM's visual embeddings ``[B, N, H]``."""
        raise NotImplementedError

    def visual_grid(self, n_visual: int) -> torch.Tensor | None:
        """``[n_visual, 2]`` (row, col) of every visual token in ``[-1, 1]``, None where not defined."""
        return None


class ImageTask(Task):
    kind = "image"
    grid = IMAGE_SIZE // PATCH_SIZE
    label_classes: ClassVar[dict[str, int]] = {"colour": 7, "shape": 6, "centre": 2, "row": grid, "col": grid}

    def _generate(self, index: int, split: str, extra: bool = False):
        sample, object_map, objects, questions = generate("image", split, index, extra_questions=extra)
        return np.asarray(sample.images[0]), object_map, objects, questions

    def tower_units(self, index):
        pixels, object_map, objects, _ = self._generate(index, "train")
        labels = object_patch_labels(object_map, [o.colour for o in objects], [o.shape for o in objects],
                                     [o.centre for o in objects])
        return torch.from_numpy(pixels[None].copy()), {k: v[None] for k, v in labels.items()}

    def media_and_questions(self, index, split, rng, extra):
        pixels, object_map, objects, questions = self._generate(index, split, extra)
        cov = coverage(object_map, len(objects), PATCH_SIZE)
        out = []
        for q in questions:
            roles = {i: {"A": 1, "B": 2}[r] for i, r in q.evidence.items() if r in ("A", "B")}
            aux = _roles_to_aux(cov, roles, 0.1).reshape(-1)  # all four patches of an aligned shape
            out.append((self.ids(q.text), self.word(q.answer), aux, q.category, None))
        return torch.from_numpy(pixels[None].copy()), out

    def pack(self, model, features):
        return model.model.multi_modal_projector(features.float())

    def visual_grid(self, n_visual):
        side = math.isqrt(n_visual)
        if side * side != n_visual:
            return None
        axis = torch.linspace(-1.0, 1.0, side)
        return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)


class DocumentTask(Task):
    kind = "document"
    label_classes: ClassVar[dict[str, int]] = {"colour": 7, "glyph": 2, "shape": 6}

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.image_processor = build_processor("document").image_processor

    def _pixels(self, page) -> torch.Tensor:
        return self.image_processor([page], return_tensors="pt")["pixel_values"][0].half()  # [5, 3, S, S]

    def _labels(self, block_map, glyph_map, blocks) -> tuple[dict, dict]:
        base = document_patch_labels(block_map, glyph_map, blocks, 2 * PATCH_SIZE)
        full = document_patch_labels(block_map, glyph_map, blocks, PATCH_SIZE)
        g = CROP_SIZE // PATCH_SIZE
        n = PAGE_SIZE // CROP_SIZE
        out = {}
        for k in base:
            crops = [full[k][y * g : (y + 1) * g, x * g : (x + 1) * g] for y in range(n) for x in range(n)]
            out[k] = np.stack([base[k], *crops]).reshape(1 + n * n, -1)
        return out

    def tower_units(self, index):
        sample, block_map, glyph_map, blocks = generate("document", "train", index)
        return self._pixels(sample.images[0]), self._labels(block_map, glyph_map, blocks)

    def media_and_questions(self, index, split, rng, extra):
        sample, block_map, glyph_map, blocks = generate("document", split, index)
        category = sample.meta["category"]
        asked = [(category, sample.question, sample.answer, 0,
                  answer_glyph_indices(category, sample.question, blocks[0]))]
        if extra:
            asked += [q for q in ask_more_document(rng, blocks) if q[1] != sample.question]
        first_glyph = np.cumsum([0] + [len(b.glyphs) for b in blocks])
        n_glyphs = int(first_glyph[-1])
        covs = {cell: (coverage(block_map, len(blocks), cell), coverage(glyph_map, n_glyphs, cell))
                for cell in (2 * PATCH_SIZE, PATCH_SIZE)}
        # The curriculum always shows EVERY box (thumbnail and crops): showing only the asked one let the LM find
        # it as "the box with no tokens missing" (validation flat at 36% = one box in 2-4 while the train
        # loss fell to 0.2-0.4), so it never learnt to match the colour or glyph the question names.
        every_box = {b: 1 for b in range(len(blocks))}
        shown_full = _roles_to_aux(covs[PATCH_SIZE][0], every_box, 0.2) > 0
        focus = np.concatenate([(_roles_to_aux(covs[2 * PATCH_SIZE][0], every_box, 0.2) > 0).reshape(-1),
                                np.pad(shown_full, ((0, 0), (0, 1))).reshape(-1)])
        out = []
        for category, text, answer, block, glyph_ids in asked:
            # role 1: the box's tokens (thumbnail and crops); role 2: the cells of the glyphs the answer is
            # read from, at full resolution only (one token per glyph, so counts are exact)
            base = _roles_to_aux(covs[2 * PATCH_SIZE][0], {block: 1}, 0.2)
            block_cov, glyph_cov = covs[PATCH_SIZE]
            answer_cells = _roles_to_aux(glyph_cov, {int(first_glyph[block]) + j: 2 for j in glyph_ids}, 0.1)
            full = np.maximum(_roles_to_aux(block_cov, {block: 1}, 0.2), answer_cells)
            full = np.concatenate([full, np.zeros((full.shape[0], 1), np.int64)], axis=1)  # newline slots
            out.append((self.ids(text), self.word(answer), np.concatenate([base.reshape(-1), full.reshape(-1)]),
                        category, focus))
        return self._pixels(sample.images[0]), out

    def pack(self, model, features):
        b, crops, tokens, _ = features.shape
        projected = model.model.multi_modal_projector(features.float().flatten(0, 1)).view(b, crops, tokens, -1)
        sizes = torch.tensor([[PAGE_SIZE, PAGE_SIZE]] * b)
        packed, _ = model.model.pack_image_features(
            list(projected), sizes, image_newline=model.model.image_newline,
            vision_aspect_ratio=model.config.vision_aspect_ratio,
        )
        return torch.stack(packed)


class VideoTask(Task):
    kind = "video"
    grid = FRAME_SIZE // PATCH_SIZE
    label_classes: ClassVar[dict[str, int]] = {"colour": 7, "shape": 6, "centre": 2, "row": grid, "col": grid}

    def tower_units(self, index):
        sample, maps, tracks, _ = generate("video", "train", index)
        labels = []
        for t in range(NUM_FRAMES):
            labels.append(object_patch_labels(
                maps[t], [tr.colours[t] for tr in tracks], [tr.shape for tr in tracks],
                [(tr.box(t)[0] + tr.size / 2, tr.box(t)[1] + tr.size / 2) for tr in tracks if tr.visible[t]],
            ))
        stacked = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
        return torch.from_numpy(sample.video.copy()), stacked

    @staticmethod
    def roles(category: str, refs: tuple[int, ...], tracks) -> list[dict[int, int]]:
        """Per frame: ``{object: role}`` of the referents' tokens (see READOUTS).

        Single-referent questions: role 2 while the referent is as in the first frame, role 1 once it is as in
        the last frame (none of either when it is invisible then: an appearing object has no role 2, a
        disappearing one no role 1), nothing in between (a moving object's intermediate cells). "order":
        role 1 = the first-appearing object in the frames before the other appears, role 2 = the other one.
        """
        if category == "order":
            first, second = sorted(refs, key=lambda i: tracks[i].event_frames[0])
            at = tracks[second].event_frames[0]
            return [{**({first: 1} if t < at else {}), **({second: 2} if tracks[second].visible[t] else {})}
                    for t in range(NUM_FRAMES)]
        (i,) = refs
        tr = tracks[i]

        def state(t: int):
            return (tr.visible[t], tr.box(t), tr.colours[t])

        out = []
        for t in range(NUM_FRAMES):
            role = {}
            if tr.visible[t] and tr.visible[-1] and state(t) == state(NUM_FRAMES - 1):
                role = {i: 1}
            elif tr.visible[t] and tr.visible[0] and state(t) == state(0):
                role = {i: 2}
            out.append(role)
        return out

    def media_and_questions(self, index, split, rng, extra):
        sample, maps, tracks, referents = generate("video", split, index)
        asked = [(sample.meta["category"], sample.question, sample.answer, tuple(range(referents)))]
        if extra:
            asked += [q for q in ask_more_video(rng, tracks) if q[1] != sample.question]
        covs = [coverage(maps[t], len(tracks), 2 * PATCH_SIZE) for t in range(NUM_FRAMES)]
        out = []
        for category, text, answer, refs in asked:
            per_frame = self.roles(category, refs, tracks)
            aux = np.concatenate([_roles_to_aux(c, r, 0.15).reshape(-1) for c, r in zip(covs, per_frame)]
                                 + [np.zeros(1, np.int64)])
            # the whole row and column through each referent's first cell, in every frame: they hold all its
            # motion whichever way it goes, and nothing in them depends on what happens
            cross = np.zeros((self.grid // 2, self.grid // 2), bool)
            for i in refs:
                x0, y0, _, _ = tracks[i].box(0)
                cross[y0 // (2 * PATCH_SIZE)] = True
                cross[:, x0 // (2 * PATCH_SIZE)] = True
            focus = np.concatenate([np.tile(cross.reshape(-1), NUM_FRAMES), np.zeros(1, bool)])
            out.append((self.ids(text), self.word(answer), aux, category, focus))
        return torch.from_numpy(sample.video.copy()), out

    def pack(self, model, features):
        b, _frames, _tokens, _ = features.shape
        projected = model.model.multi_modal_projector(features.float().flatten(0, 1))
        pooled = model.model.apply_pooling(projected).reshape(b, -1, projected.shape[-1])
        newline = model.model.image_newline[None, None].expand(b, 1, -1)
        return torch.cat([pooled, newline], dim=1)


TASKS = {"image": ImageTask, "document": DocumentTask, "video": VideoTask}


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The visual features the model's projector reads (``vision_feature_layer``, CLS dropped for "default")."""
    config = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    features = out.hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return features


# ----- stage 1: tower -----------------------------------------------------------------------------------------
def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tower(model, task: Task, plan: Plan, log) -> dict:
    t0 = time.time()
    units, labels = [], {k: [] for k in task.label_classes}
    for i in range(plan.tower_pool):
        u, lab = task.tower_units(i)
        units.append(u)
        for k in labels:
            labels[k].append(torch.from_numpy(lab[k]))
    units_t = torch.cat(units)
    labels_t = {k: torch.cat(v) for k, v in labels.items()}
    log(f"tower pool: {units_t.shape[0]} units {tuple(units_t.shape[1:])} in {time.time() - t0:.0f}s")

    vision = model.model.vision_tower
    dim = model.config.vision_config.hidden_size
    heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in task.label_classes.items()})
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=plan.tower_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(plan.seed + 1)
    n_units = units_t.shape[0]
    vision.train()
    t1 = time.time()
    for step in range(plan.tower_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, plan.tower_steps, plan.tower_lr, 50)
        idx = torch.randint(n_units, (plan.tower_batch,), generator=gen)
        feats = tower_features(model, task.tower_pixels(units_t[idx]))
        losses = {}
        for k, head in heads.items():
            logits = head(feats).flatten(0, 1)
            losses[k] = F.cross_entropy(logits, labels_t[k][idx].reshape(-1), ignore_index=IGNORE)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == plan.tower_steps - 1:
            log(f"tower step {step} loss {loss.item():.3f} " + " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
                + f" ({time.time() - t1:.0f}s)")
    vision.eval()
    # Held-out per-patch accuracy on fresh train-split samples beyond the pool.
    accs = {k: [] for k in heads}
    with torch.no_grad():
        for i in range(plan.tower_pool, plan.tower_pool + 40):
            u, lab = task.tower_units(i)
            feats = tower_features(model, task.tower_pixels(u))
            for k, head in heads.items():
                target = torch.from_numpy(lab[k]).reshape(-1)
                pred = head(feats).flatten(0, 1).argmax(-1)
                keep = target != IGNORE
                # foreground-only accuracy for the class heads (background dominates otherwise)
                if k in ("colour", "shape", "glyph"):
                    keep &= target > 0
                accs[k].append((pred[keep] == target[keep]).float().sum().item() / max(1, keep.sum().item()))
    result = {k: round(float(np.mean(v)), 4) for k, v in accs.items()}
    log(f"tower held-out per-patch accuracy {result} ({time.time() - t0:.0f}s in all)")
    for p in vision.parameters():
        p.requires_grad_(False)
    return {"seconds": round(time.time() - t0, 1), "steps": plan.tower_steps, "held_out_accuracy": result}


# ----- stage 2: language ------------------------------------------------------------------------------------------
def build_pool(model, task: Task, split: str, indices: range, questions_per_media: int, seed: int, log):
    """Cache frozen-tower features (fp16) of the samples ``indices`` and list up to ``questions_per_media``
    questions about each (the sample's own question first)."""
    t0 = time.time()
    feats: list[torch.Tensor] = []
    questions: list[Question] = []
    chunk: list[torch.Tensor] = []

    def flush():
        if not chunk:
            return
        units = torch.cat(chunk)
        with torch.no_grad():
            out = torch.cat([tower_features(model, task.tower_pixels(units[s : s + 64])).half()
                             for s in range(0, units.shape[0], 64)])
        per_media = chunk[0].shape[0]
        feats.append(out.view(len(chunk), per_media, *out.shape[1:]))
        chunk.clear()

    for n, i in enumerate(indices):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7, i)))
        media, asked = task.media_and_questions(i, split, rng, questions_per_media > 1)
        chunk.append(media)
        for ids, answer, aux, category, focus in asked[:questions_per_media]:
            questions.append(Question(n, ids, answer, aux.astype(np.int8), category, focus))
        if len(chunk) == 32:
            flush()
    flush()
    features = torch.cat(feats)
    if task.kind == "image":
        features = features[:, 0]
    log(f"{split} pool: {features.shape[0]} media, {len(questions)} questions, features {tuple(features.shape)} "
        f"in {time.time() - t0:.0f}s")
    return features, questions


def make_batch(questions: list[Question], placeholder: int, n_visual: int, answer_prefix: list[int], eos: int,
               pad: int, keeps: list[np.ndarray] | None = None):
    """Left-padded ids, mask, targets (-100 but at the answer and EOS), per-token aux labels and position ids.

    ``keeps[i]`` (sorted visual-token indices) shows question ``i`` only those visual tokens, at their original
    positions (the curriculum's short sequences); by default all ``n_visual``.
    """
    rows = []
    for i, q in enumerate(questions):
        keep = np.arange(n_visual) if keeps is None else keeps[i]
        n = len(q.ids)
        seq = q.ids + [placeholder] * len(keep) + answer_prefix + [q.answer]
        positions = list(range(n)) + (n + keep).tolist() + list(range(n + n_visual, n + n_visual + len(answer_prefix) + 1))
        tgt = [IGNORE] * len(seq)
        tgt[-2], tgt[-1] = q.answer, eos  # predicted at the last prefix token and at the answer
        aux = [IGNORE] * n + q.aux[keep].tolist() + [IGNORE] * (len(answer_prefix) + 1)
        rows.append((seq, tgt, aux, positions))
    length = max(len(r[0]) for r in rows)
    b = len(rows)
    ids = torch.full((b, length), pad, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    target = torch.full((b, length), IGNORE, dtype=torch.long)
    aux_t = torch.full((b, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    for r, (seq, tgt, aux, positions) in enumerate(rows):
        n = len(seq)
        ids[r, length - n :] = torch.tensor(seq)
        mask[r, length - n :] = 1
        target[r, length - n :] = torch.tensor(tgt)
        aux_t[r, length - n :] = torch.tensor(aux)
        position_ids[r, length - n :] = torch.tensor(positions)
    return ids, mask, target, aux_t, position_ids


def curriculum_keeps(questions: list[Question], n_visual: int, distractors: int | list[int], gen: torch.Generator):
    """Per question: every visual token of what it refers to (aux > 0) plus ``distractors`` random others
    (one count for all, or one per question).

    Answers stay valid (the referents are all there), while the attention that must find them is spread over
    far fewer tokens than 256+: from random init the readout is found within a few hundred steps this way,
    whereas with all tokens from the start the LM sat near chance for 500+ steps (see the module docstring).
    """
    keeps = []
    if isinstance(distractors, int):
        distractors = [distractors] * len(questions)
    for q, count in zip(questions, distractors):
        shown = q.aux[:n_visual] > 0
        if q.focus is not None:
            shown = shown | q.focus[:n_visual]
        referents = np.nonzero(shown)[0]
        others = np.nonzero(~shown)[0]
        if count < len(others):
            others = others[torch.randperm(len(others), generator=gen)[:count].numpy()]
        keeps.append(np.sort(np.concatenate([referents, others])))
    return keeps


def lm_forward(model, ids, mask, visual: torch.Tensor, placeholder: int, attentions: bool = False,
               position_ids: torch.Tensor | None = None):
    """The LM on ids whose placeholders hold ``visual`` (``[total placeholders, H]`` or ``[B, n, H]``): (last normed
    hidden states, every layer's hidden states (``[0]`` the embeddings), and with ``attentions`` the last
    layer's attention from the answer position ``[B, heads, L]``).

    The readout needs one attention row per sequence, so it is recomputed from the last layer's captured
    attention inputs (queries against its keys, differentiable) while every layer runs SDPA: eager attention
    over 600-750 tokens made training several times slower.
    """
    from tokenreduce.core.llm import AttentionCapture

    embeds = model.model.get_input_embeddings()(ids)
    slots = (ids == placeholder)[..., None]
    embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    language_model = model.model.language_model
    captured = {}
    handle = None
    if attentions:
        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in kwargs["position_embeddings"])
            captured["capture"] = AttentionCapture(module, hidden, cos, sin)

        handle = language_model.layers[-1].self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        out = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                             output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    last_attention = None
    if attentions:
        cap = captured["capture"]
        b, length = ids.shape
        q = cap.query_states(torch.full((b, 1), length - 2, dtype=torch.long, device=ids.device))  # [B, Hq, 1, d]
        k = cap.key_states()  # [B, Hkv, L, d]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2))[:, :, 0] * cap.module.scaling  # [B, Hq, L]
        allowed = mask.bool().clone()
        allowed[:, length - 1] = False  # causal: the answer position does not see the token after it
        last_attention = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return out.last_hidden_state, out.hidden_states, last_attention


def cached_pool(model, task: Task, split: str, indices: range, per_media: int, seed: int, log, work):
    """:func:`build_pool`, saved to / loaded from ``work`` when given (the pool depends on the tower only)."""
    path = work / f"pool-{split}-{indices.start}-{indices.stop}-{per_media}.pt" if work else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=False)
        log(f"reused {split} pool from {path}")
        return saved["features"], saved["questions"]
    features, questions = build_pool(model, task, split, indices, per_media, seed, log)
    if path is not None:
        torch.save({"features": features, "questions": questions}, path)
    return features, questions


def dropped_distractors(count: int, distractors: int, n_visual: int, token_drop: float,
                        gen: torch.Generator) -> list[int]:
    """Per question the number of non-referent tokens shown: ``distractors``, or for a ``token_drop`` share of
    the questions a uniform 5-100% of ``n_visual``.

    A large VLM already knows that background it does not see holds no answer; a tiny one trained on full
    inputs only is thrown by any missing token (its answer leans on every softmax share), which would judge a
    pruning method by the model's shock rather than by which tokens it keeps.
    """
    if token_drop <= 0:  # no draw: runs without it stay bit-identical to those before it existed
        return [distractors] * count
    drop = (torch.rand(count, generator=gen) < token_drop).tolist()
    share = (0.05 + 0.95 * torch.rand(count, generator=gen)).tolist()
    return [min(distractors, int(s * n_visual)) if d else distractors for d, s in zip(drop, share)]


@dataclass
class Pools:
    """Cached tower features and questions of the language stage's train and validation samples."""

    feats: torch.Tensor
    questions: list[Question]
    val_feats: torch.Tensor
    val_questions: list[Question]


def language_pools(model, task: Task, plan: Plan, log, work: Path | None = None) -> Pools:
    """The pools :func:`train_language` reads (train samples after the tower's, the first validation ones)."""
    start = plan.tower_pool + 100
    feats, questions = cached_pool(model, task, "train", range(start, start + plan.lm_pool),
                                   plan.questions_per_media, plan.seed, log, work)
    val_feats, val_questions = cached_pool(model, task, "validation", range(plan.val_size), 1, plan.seed, log, work)
    return Pools(feats, questions, val_feats, val_questions)


def train_language(model, task: Task, plan: Plan, log, work: Path | None = None,
                   checkpoint: Callable[[dict], None] | None = None, pools: Pools | None = None,
                   phase: int = 0) -> dict:
    """Stage 2 (one phase); ``checkpoint(partial summary)`` runs after every validation (the run can be
    continued from it). ``pools`` reuses those of an earlier phase; ``phase`` > 0 draws other batches."""
    t0 = time.time()
    tok = task.tokenizer
    placeholder = model.config.video_token_index if task.kind == "video" else model.config.image_token_index
    answer_prefix = tok(" answer :", add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    pools = pools or language_pools(model, task, plan, log, work)
    feats, questions, val_feats, val_questions = pools.feats, pools.questions, pools.val_feats, pools.val_questions
    with torch.no_grad():
        n_visual = task.pack(model, feats[:1]).shape[1]

    weights = torch.tensor([plan.category_weights.get(q.category, 1.0) for q in questions])
    probe = nn.Linear(model.config.text_config.hidden_size, 3)
    frozen = ("model.vision_tower",) + (() if plan.train_language else ("model.language_model", "lm_head"))
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(probe.parameters())
    grid = task.visual_grid(n_visual) if plan.grid_weight > 0 else None
    if grid is not None:
        grid_probe = nn.Linear(model.config.text_config.hidden_size, 2)
        trainable += list(grid_probe.parameters())
    opt = torch.optim.AdamW(trainable, lr=plan.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(plan.seed + 2 + 1000 * phase)
    history = []

    def evaluate() -> dict:
        model.eval()
        hits: dict[str, list[bool]] = {}
        with torch.no_grad():
            for s in range(0, len(val_questions), 32):
                qs = val_questions[s : s + 32]
                ids, mask, _target, _, _ = make_batch(qs, placeholder, n_visual, answer_prefix, eos, pad)
                visual = task.pack(model, val_feats[[q.media for q in qs]])
                hidden, _, _ = lm_forward(model, ids, mask, visual, placeholder)
                pred = model.lm_head(hidden[:, -2]).argmax(-1)
                for q, p in zip(qs, pred.tolist()):
                    hits.setdefault(q.category, []).append(p == q.answer)
                    hits.setdefault("all", []).append(p == q.answer)
        model.train()
        return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}

    model.train()
    t1 = time.time()
    for step in range(plan.lm_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, plan.lm_steps, plan.lm_lr, plan.warmup)
        idx = torch.multinomial(weights, plan.lm_batch, replacement=True, generator=gen).tolist()
        qs = [questions[i] for i in idx]
        ramp = min(1.0, step / max(1, plan.curriculum * plan.lm_steps)) if plan.curriculum else 1.0
        keeps = curriculum_keeps(qs, n_visual, dropped_distractors(len(qs), int(ramp**2 * n_visual), n_visual,
                                                                 plan.token_drop, gen), gen)
        ids, mask, target, aux, position_ids = make_batch(qs, placeholder, n_visual, answer_prefix, eos, pad, keeps)
        visual = task.pack(model, feats[[q.media for q in qs]])
        visual = torch.cat([visual[r, torch.from_numpy(k)] for r, k in enumerate(keeps)])
        hidden, states, attention = lm_forward(model, ids, mask, visual, placeholder, plan.readout_weight > 0,
                                               position_ids)
        middle = states[plan.aux_layer]
        rows, cols = (target != IGNORE).nonzero(as_tuple=True)
        answer_loss = F.cross_entropy(model.lm_head(hidden[rows, cols]), target[rows, cols])
        arow, acol = (aux != IGNORE).nonzero(as_tuple=True)
        aux_loss = F.cross_entropy(probe(middle[arow, acol]), aux[arow, acol], weight=torch.tensor([1.0, 4.0, 4.0]))
        attention_loss = readout_loss(attention, aux, qs, task.kind) if attention is not None else hidden.sum() * 0
        loss = answer_loss + plan.aux_weight * aux_loss + plan.readout_weight * attention_loss
        if grid is not None:  # visual slots in row order, each row's shown tokens in their original order
            where = grid_probe(states[-2][ids == placeholder])
            loss = loss + plan.grid_weight * F.mse_loss(where, grid[torch.from_numpy(np.concatenate(keeps))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"lm step {step} answer {answer_loss.item():.3f} aux {aux_loss.item():.3f} "
                f"readout {attention_loss.item():.3f} ({time.time() - t1:.0f}s)")
        if (step + 1) % plan.eval_every == 0 or step == plan.lm_steps - 1:
            acc = evaluate()
            history.append({"step": step + 1, "seconds": round(time.time() - t1, 1), **acc})
            log(f"lm step {step + 1} validation {acc}")
            if checkpoint is not None and step < plan.lm_steps - 1:
                checkpoint({"seconds": round(time.time() - t0, 1), "steps": step + 1, "history": history,
                            "partial": True})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"seconds": round(time.time() - t0, 1), "steps": plan.lm_steps, "questions": len(questions),
            "media": int(feats.shape[0]), "history": history}


def train_phases(model, task: Task, plans: list[Plan], log, work: Path | None = None,
                 checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Every language phase of ``plans`` in turn on the same pools (:meth:`Plan.phases`); one summary whose
    steps, seconds and validation history count from the start of the first phase."""
    pools = language_pools(model, task, plans[0], log, work)
    done, seconds, history, phases = 0, 0.0, [], []

    def counted(summary: dict, phase: int) -> tuple[int, float, list[dict]]:
        steps = [{**h, "step": done + h["step"], **({"phase": phase + 1} if len(plans) > 1 else {})}
                 for h in summary["history"]]
        return done + summary["steps"], seconds + summary["seconds"], history + steps

    for i, plan in enumerate(plans):
        if len(plans) > 1:
            log(f"language phase {i + 1} of {len(plans)}: {plan.lm_steps} steps, lr {plan.lm_lr}, curriculum "
                f"{plan.curriculum}, token drop {plan.token_drop}, weights {plan.category_weights}")

        def partial(summary: dict, i: int = i) -> None:
            steps, secs, hist = counted(summary, i)
            checkpoint({**summary, "steps": steps, "seconds": secs, "history": hist})

        result = train_language(model, task, plan, log, checkpoint=partial if checkpoint else None, pools=pools,
                                phase=i)
        done, seconds, history = counted(result, i)
        phases.append({"steps": plan.lm_steps, "lr": plan.lm_lr, "seconds": result["seconds"]})
    summary = {**result, "steps": done, "seconds": round(seconds, 1), "history": history}
    return {**summary, "phases": phases} if len(plans) > 1 else summary


# Text-config keys that fix the language model's function; the rest (model type, bias flags) may differ.
LANGUAGE_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
                  "tie_word_embeddings")


def take_language_model(model, source: str | Path) -> None:
    """Copy the language model and LM head of the saved model at ``source`` into ``model`` (in place).

    The families share one tokenizer and text sizes, so a trained LM carries its circuits (find what the
    question names, read it out) to another family; only the projector has to learn the new features. The
    image model's Llama goes into the OneVision models' Qwen2 as the same function: Qwen2 only adds biases to
    the query, key and value projections, which are set to zero.
    """
    from transformers import AutoModelForImageTextToText

    donor = AutoModelForImageTextToText.from_pretrained(source)
    mine, theirs = model.config.text_config.to_dict(), donor.config.text_config.to_dict()
    differ = sorted(k for k in LANGUAGE_SHAPE if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"`--language-from`={str(source)!r}: its text config differs in {differ}; it must match")
    target = model.model.language_model
    missing, unexpected = target.load_state_dict(donor.model.language_model.state_dict(), strict=False)
    extra = [k for k in missing if not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    if extra or unexpected:
        raise ValueError(f"`--language-from`={str(source)!r}: its language model does not fit "
                         f"(missing {extra[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name in missing:
            target.get_parameter(name).zero_()
    model.lm_head.load_state_dict(donor.lm_head.state_dict())


# ----- checks through the real path -------------------------------------------------------------------------------
def check_real_path(model, processor, task: Task, n: int, log) -> dict:
    """Accuracy through processor + ``generate`` on validation samples: full tokens and random at 10%."""
    import tokenreduce as tr
    from tokenreduce.eval.predict import predict
    from tokenreduce.eval.synthetic.benchmark import load_synthetic
    from tokenreduce.eval.synthetic.prompting import score

    samples = load_synthetic(task.kind, "validation", n)
    # The cached-feature packing must equal the model's own encoder path.
    inputs = processor(text=[prompt(samples[0])], return_tensors="pt",
                       **({"videos": [samples[0].video]} if task.kind == "video" else {"images": samples[0].images}))
    with torch.no_grad():
        if task.kind == "video":
            ref = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
            mine = task.pack(model, tower_features(model, inputs["pixel_values_videos"][0])[None])[0]
        elif task.kind == "document":
            ref = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
            mine = task.pack(model, tower_features(model, inputs["pixel_values"][0])[None])[0]
        else:
            ref = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
            mine = task.pack(model, tower_features(model, inputs["pixel_values"]))[0]
    torch.testing.assert_close(mine, ref.reshape(mine.shape), atol=1e-4, rtol=1e-4)
    t0 = time.time()
    full = score(samples, predict(model, processor, samples))
    tr.wrap(model, "random", keep=0.1, seed=0)
    try:
        rand = score(samples, predict(model, processor, samples))
    finally:
        tr.unwrap(model)
    log(f"real path on {n} validation samples: full {full} random@0.1 {rand} ({time.time() - t0:.0f}s)")
    return {"full": full, "random_0.1": rand}


# Options that set the language schedule: given any of them (or --init), the run is one phase.
SCHEDULE_OPTIONS = ("lm_steps", "lm_lr", "curriculum", "warmup", "token_drop", "category_weights")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(TASKS))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped asset dir)")
    parser.add_argument("--tower-steps", type=int, default=None)
    parser.add_argument("--lm-steps", type=int, default=None)
    parser.add_argument("--tower-pool", type=int, default=None)
    parser.add_argument("--lm-pool", type=int, default=None)
    parser.add_argument("--lm-lr", type=float, default=None)
    parser.add_argument("--aux-weight", type=float, default=None)
    parser.add_argument("--grid-weight", type=float, default=None,
                        help="weight of reading each visual token's row and column from the last layer's input")
    parser.add_argument("--check", type=int, default=200, help="validation samples for the final real-path check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tower-only", action="store_true", help="stop after the tower stage (experiments)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a model saved by an earlier run (its tower is kept frozen)")
    parser.add_argument("--curriculum", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--token-drop", type=float, default=None,
                        help="share of questions shown their referents and only 5-100%% of the other visual tokens")
    parser.add_argument("--category-weights", default=None,
                        help="sampling weights of question categories, e.g. position=3,count=2")
    parser.add_argument("--language-from", type=Path, default=None,
                        help="start the language model and LM head from this saved model (same text config), "
                             "e.g. the shipped video model for documents")
    parser.add_argument("--tower-lr", type=float, default=None)
    parser.add_argument("--tower-batch", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None,
                        help="cache the trained tower and feature pools here and reuse them on the next run")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    plan = replace(PLANS[args.kind])
    for name in ("tower_steps", "lm_steps", "tower_pool", "lm_pool", "lm_lr", "aux_weight", "grid_weight", "tower_lr",
                 "tower_batch", "curriculum", "warmup", "token_drop"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if args.category_weights:
        plan.category_weights = {k: float(v) for k, v in (kv.split("=") for kv in args.category_weights.split(","))}
    if args.init is not None or any(getattr(args, name) is not None for name in SCHEDULE_OPTIONS):
        plan.then = ()  # a schedule from the command line replaces the recipe's: one phase
    language_from = args.language_from
    if language_from is None and plan.language_from is not None and args.init is None:
        language_from = model_dir(plan.language_from)
        if not (language_from / "config.json").is_file():
            raise SystemExit(
                f"the {args.kind} recipe starts its language model from the {plan.language_from} model, and "
                f"{language_from} holds none: train it first (python -m research.synthetic.train "
                f"{plan.language_from}) or pass --language-from DIR"
            )
    out = args.out or model_dir(args.kind)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    torch.manual_seed(plan.seed)
    model = build_model(args.kind, seed=plan.seed)
    processor = build_processor(args.kind)
    task = TASKS[args.kind](build_tokenizer())
    log(f"{args.kind}: {sum(p.numel() for p in model.parameters())} parameters; plan {plan}")
    work = args.work / args.kind if args.work else None
    tower_file = work / "tower.pt" if work else None
    if args.init is not None:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.init)
        model.model.vision_tower.requires_grad_(False)
        earlier = json.loads((args.init / "training_summary.json").read_text())
        tower = earlier["tower"]
        log(f"continuing from {args.init} ({earlier['language']['steps']} LM steps there)")
    elif tower_file is not None and tower_file.is_file():
        saved = torch.load(tower_file)
        model.model.vision_tower.load_state_dict(saved["state"])
        model.model.vision_tower.requires_grad_(False)
        tower = saved["summary"]
        log(f"reused tower from {tower_file}: {tower}")
    else:
        tower = train_tower(model, task, plan, log)
        if tower_file is not None:
            tower_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.model.vision_tower.state_dict(), "summary": tower}, tower_file)
    if args.tower_only:
        return
    if language_from is not None:
        take_language_model(model, language_from)
        log(f"language model and LM head from {language_from}")

    def save(language: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        if language.get("partial"):  # enough for --init to continue from here if the run stops
            (out / "training_summary.json").write_text(json.dumps(
                {"kind": args.kind, "plan": asdict(plan), "tower": tower, "language": language}, indent=1) + "\n")
        log(f"saved to {out} after {language['steps']} LM steps")

    language = train_phases(model, task, plan.phases(), log, work, checkpoint=save)
    save(language)
    check = check_real_path(model, processor, task, args.check, log) if args.check else {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"kind": args.kind, "parameters": sum(p.numel() for p in model.parameters()), "plan": asdict(plan),
               "tower": tower, "language": language, "check": check,
               "continued_from": json.loads((args.init / "training_summary.json").read_text()) if args.init else None,
               "language_from": str(language_from) if language_from else None,
               "total_seconds": round(time.time() - t0, 1),
               # CPU seconds used by this process: on shared cores the wall clock overstates the cost.
               "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "torch_threads": args.threads}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("done")


if __name__ == "__main__":
    main()
