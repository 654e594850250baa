"""Qwen2-VL and Qwen2.5-VL: merged 2x2 patches, M-RoPE (t/h/w) positions, ``mm_token_type_ids``."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.sequence import rope_positions, text_positions

from .base import Adapter


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    modalities = ("image", "video")
    # No vision stage: the Qwen vision transformer (windowed, merged patches) is not a supported tower.
    stages = ("projector", "llm", "decode")
    position_axes = 3  # M-RoPE: temporal, height, width
    _rope_params: tuple[str, ...] | None = None

    def layouts(self, modality, inputs, counts=None):
        grid = inputs.get(f"{modality}_grid_thw")
        if grid is None:
            raise ValueError(f"`{modality}_grid_thw` is required with {modality} inputs for {self.name}")
        merge = self.config.vision_config.spatial_merge_size
        kind = "frame" if modality == "video" else "base"
        out = []
        for t, h, w in self._host_grid(modality, grid):
            segments = tuple(Segment(kind, h // merge, w // merge, time=i) for i in range(t))
            out.append(TokenLayout(modality, segments, image_size=(h * self._patch, w * self._patch)))
        return out

    def attach(self, handle) -> None:
        """Make the model's rope index read the grids from the host copy the layouts read.

        ``get_rope_index`` reads every grid value with ``.item()`` (the plain model's forward calls it, and so
        does :meth:`position_ids`); a grid tensor the layouts already read is handed to it as a numpy array
        (numpy scalars have ``.item()`` too), so those reads wait for no device."""
        original = self.inner.get_rope_index

        @functools.wraps(original)
        def get_rope_index(*args, **kwargs):
            host, grids = dict(kwargs), self.__dict__.get("_host_grids", {})
            for modality, (grid, listed) in grids.items():
                key = f"{modality}_grid_thw"
                if kwargs.get(key) is grid:
                    host[key] = np.asarray(listed, dtype=np.int64).reshape(-1, 3)
            if all(host[k] is v for k, v in kwargs.items()):
                return original(*args, **kwargs)
            try:
                return original(*args, **host)
            except (TypeError, AttributeError, IndexError):  # a transformers version that needs the tensors
                return original(*args, **kwargs)

        handle.patch(self.inner, "get_rope_index", get_rope_index)

    def _host_grid(self, modality: str, grid) -> list[list[int]]:
        """``{modality}_grid_thw`` as Python lists, read from the device once per tensor: the layouts and the
        rope index (:meth:`position_ids`) both read it (the last tensor read is remembered)."""
        if not torch.is_tensor(grid):
            return [[int(v) for v in row] for row in grid]
        memo = self.__dict__.setdefault("_host_grids", {})
        seen = memo.get(modality)
        if seen is None or seen[0] is not grid:
            seen = (grid, grid.tolist())
            memo[modality] = seen
        return seen[1]

    @property
    def _patch(self) -> int:
        return self.config.vision_config.patch_size

    def position_ids(self, input_ids, attention_mask, inputs):
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{self.name} needs `mm_token_type_ids` (0 text, 1 image, 2 video) with visual inputs; "
                "the processor returns it next to `input_ids`"
            )
        if self._rope_params is None:
            self._rope_params = tuple(inspect.signature(self.inner.get_rope_index).parameters)
        kwargs = {k: inputs[k] for k in self._rope_params if k in inputs and k not in ("input_ids", "attention_mask")}
        positions, _ = self.inner.get_rope_index(input_ids, attention_mask=attention_mask, **kwargs)
        return positions

    def text_positions_in_generate(self, inputs):
        return inputs.get("mm_token_type_ids") is None

    def format_positions(self, positions, attention_mask):
        # 2-D ids given by the caller: the model uses them on every M-RoPE axis
        positions = rope_positions(positions, self.position_axes)
        # Row 0 holds plain text positions (used for masks only), rows 1-3 the t/h/w rotary ids.
        return torch.cat([text_positions(attention_mask)[None].to(positions), positions], dim=0)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
