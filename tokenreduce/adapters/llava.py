"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one grid of patch tokens per image."""

from __future__ import annotations

import warnings
from typing import Any

from tokenreduce.core.layout import Segment, TokenLayout

from .base import Adapter


def vision_grid_side(vision_config) -> int:
    return vision_config.image_size // vision_config.patch_size


class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava",)
    modalities = ("image",)
    stages = ("vision", "projector", "llm", "decode")

    def layouts(self, modality, inputs: dict[str, Any], counts=None) -> list[TokenLayout]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:  # precomputed features: infer square grids from the counts
            return [TokenLayout.square_or_flat(modality, n) for n in counts]
        patch = self.config.vision_config.patch_size
        rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        num_images = pixel_values.shape[0]
        grid, with_cls = self._grids(rows, cols, tuple(pixel_values.shape[-2:]))
        out = []
        for i in range(num_images):
            n = None if counts is None else counts[i]
            if n is None or n == rows * cols:
                out.append(grid)
            elif n == rows * cols + 1:
                out.append(with_cls)
            else:
                warnings.warn(
                    f"llava: image {i} has {n} visual tokens, not the {rows}x{cols} grid its pixels imply; "
                    "treating its tokens as an unstructured sequence",
                    stacklevel=3,
                )
                out.append(TokenLayout.flat("image", n))
        return out

    def _grids(self, rows: int, cols: int, size: tuple[int, int]) -> tuple[TokenLayout, TokenLayout]:
        """The grid layout of an image of ``size`` pixels, without and with a CLS token: built once per size
        (layouts are immutable; their index tensors are then built once too)."""
        memo = self.__dict__.setdefault("_grid_layouts", {})
        key = (rows, cols, size)
        if key not in memo:
            if len(memo) >= 16:
                memo.pop(next(iter(memo)))
            memo[key] = (
                TokenLayout("image", (Segment("base", rows, cols),), image_size=size),
                TokenLayout("image", (Segment("cls", 1, 1), Segment("base", rows, cols)), image_size=size),
            )
        return memo[key]
