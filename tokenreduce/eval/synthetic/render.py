"""Drawing primitives shared by the generators: textured backgrounds, shape masks, compositing.

Everything is numpy (PIL only rasterises polygons), seeded by the caller's generator, and cheap: a shape
mask is rasterised once per (shape, size) and cached, so a scene costs a background plus a few pastes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOURS, TEXTURES

SUPERSAMPLE = 4


@lru_cache(maxsize=512)
def shape_coverage(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` drawn in a ``size x size`` box (float32, read-only)."""
    s = size * SUPERSAMPLE
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    last = s - 1
    if shape == "circle":
        draw.ellipse([0, 0, last, last], fill=255)
    elif shape == "square":
        inset = round(0.1 * s)
        draw.rectangle([inset, inset, last - inset, last - inset], fill=255)
    elif shape == "triangle":
        draw.polygon([(s / 2, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(s / 2, 0), (last, s / 2), (s / 2, last), (0, s / 2)], fill=255)
    elif shape == "cross":
        arm = s / 3
        draw.rectangle([arm, 0, last - arm, last], fill=255)
        draw.rectangle([0, arm, last, last - arm], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = img.resize((size, size), Image.Resampling.BOX)
    out = np.asarray(small, dtype=np.float32) / 255.0
    out.setflags(write=False)
    return out


def jittered_colour(rng: np.random.Generator, name: str, amount: int = 18) -> np.ndarray:
    """The palette colour ``name`` with a small per-channel jitter, as float32 RGB."""
    base = np.asarray(COLOURS[name], dtype=np.float32)
    return np.clip(base + rng.integers(-amount, amount + 1, size=3), 0, 255).astype(np.float32)


def background(rng: np.random.Generator, height: int, width: int, texture: str) -> np.ndarray:
    """A low-saturation textured background, float32 ``[H, W, 3]`` in [0, 255]."""
    level = rng.uniform(85, 185)
    tint = rng.uniform(-12, 12, size=3)
    base = np.full((height, width, 3), level, dtype=np.float32) + tint.astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if texture == "plain":
        pattern = np.zeros((height, width), np.float32)
    elif texture == "noisy":
        pattern = rng.normal(0, 12, size=(height, width)).astype(np.float32)
    elif texture == "striped":
        period = rng.uniform(6, 16)
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        pattern = rng.uniform(10, 20) * np.sign(np.sin(phase)).astype(np.float32)
    elif texture == "checkered":
        cell = int(rng.integers(8, 20))
        pattern = rng.uniform(10, 18) * (((yy // cell) + (xx // cell)) % 2 * 2 - 1)
    elif texture == "dotted":
        step = int(rng.integers(8, 14))
        radius = rng.uniform(1.5, 2.8)
        dy = (yy % step) - step / 2
        dx = (xx % step) - step / 2
        pattern = np.where(dx * dx + dy * dy <= radius * radius, -rng.uniform(18, 30), 0.0).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")
    out = base + pattern[..., None] + rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(out, 0, 255)


def paste(
    canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray, x0: int, y0: int,
    label_map: np.ndarray | None = None, label: int = 0,
) -> None:
    """Alpha-blend ``colour`` with ``coverage`` at ``(x0, y0)``; mark covered pixels (>= 0.5) in ``label_map``.

    The shape must lie inside the canvas.
    """
    h, w = coverage.shape
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    alpha = coverage[..., None]
    region *= 1.0 - alpha
    region += alpha * colour
    if label_map is not None:
        label_map[y0 : y0 + h, x0 : x0 + w][coverage >= 0.5] = label


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """Round a float canvas to uint8."""
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 0) -> bool:
    """Whether boxes ``(x0, y0, x1, y1)`` (exclusive ends) come closer than ``gap`` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])
