"""Qwen2-VL and Qwen2.5-VL: merged 2x2 patches, M-RoPE (t/h/w) positions, ``mm_token_type_ids``."""

from __future__ import annotations

import inspect

import torch

from tokenreduce.core.layout import Segment, TokenLayout

from .base import Adapter, text_positions


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    modalities = ("image", "video")
    # No vision stage: the Qwen vision transformer (windowed, merged patches) is not a supported tower.
    stages = ("projector", "llm", "decode")

    def layouts(self, modality, inputs, counts=None):
        grid = inputs.get(f"{modality}_grid_thw")
        if grid is None:
            raise ValueError(f"`{modality}_grid_thw` is required with {modality} inputs for {self.name}")
        merge = self.config.vision_config.spatial_merge_size
        kind = "frame" if modality == "video" else "base"
        out = []
        for t, h, w in grid.tolist():
            segments = tuple(Segment(kind, h // merge, w // merge, time=i) for i in range(t))
            out.append(TokenLayout(modality, segments, image_size=(h * self._patch, w * self._patch)))
        return out

    @property
    def _patch(self) -> int:
        return self.config.vision_config.patch_size

    def position_ids(self, input_ids, attention_mask, inputs):
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{self.name} needs `mm_token_type_ids` (0 text, 1 image, 2 video) with visual inputs; "
                "the processor returns it next to `input_ids`"
            )
        params = inspect.signature(self.inner.get_rope_index).parameters
        kwargs = {k: inputs[k] for k in params if k in inputs and k not in ("input_ids", "attention_mask")}
        positions, _ = self.inner.get_rope_index(input_ids, attention_mask=attention_mask, **kwargs)
        return positions

    def text_positions_in_generate(self, inputs):
        return inputs.get("mm_token_type_ids") is None

    def format_positions(self, positions, attention_mask):
        if positions.dim() == 2:  # 2-D ids given by the caller: the model uses them on every M-RoPE axis
            positions = positions[None].expand(3, -1, -1)
        # Row 0 holds plain text positions (used for masks only), rows 1-3 the t/h/w rotary ids.
        return torch.cat([text_positions(attention_mask)[None].to(positions), positions], dim=0)

    def sequential_positions(self, attention_mask):
        return text_positions(attention_mask)[None].expand(3, -1, -1)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
