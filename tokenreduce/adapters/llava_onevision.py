"""LLaVA-OneVision: anyres images (downsampled beyond ``anyres_max_N``), multi-image, and pooled video."""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenreduce.core.layout import Segment, TokenLayout

from .base import Adapter
from .llava import vision_grid_side
from .llava_next import anyres_layouts, host_image_sizes, num_anyres_patches, pooled_frame_signals


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    modalities = ("image", "video")
    stages = ("vision", "projector", "llm", "decode")

    host_read_modalities = frozenset({"image"})

    def encoder_kwargs(self, modality, kwargs):
        return host_image_sizes(self, kwargs) if modality == "image" else kwargs

    def layouts(self, modality, inputs, counts=None):
        if modality == "video":
            return self._video_layouts(inputs)
        image_sizes = inputs["image_sizes"]
        batch_num_images = inputs.get("batch_num_images")
        need_patching = None
        if batch_num_images is not None:
            need_patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        num_patches = num_anyres_patches(self, image_sizes, need_patching)
        aspect = inputs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio

        def pack(features, sizes, newline):
            return self.inner.pack_image_features(features, sizes, image_newline=newline, vision_aspect_ratio=aspect)

        return anyres_layouts(self, inputs, pack, num_patches)

    def _video_layouts(self, inputs):
        videos = inputs["pixel_values_videos"]
        num_videos, frames = videos.shape[:2]
        side = vision_grid_side(self.config.vision_config)
        pooled = math.ceil(side / 2)
        segments = tuple(Segment("frame", pooled, pooled, time=t) for t in range(frames))
        segments += (Segment("newline", 1, 0, newline=True, time=frames - 1),)
        return [TokenLayout("video", segments, image_size=tuple(videos.shape[-2:])) for _ in range(num_videos)]

    def token_signals(self, modality, layouts, per_patch):
        if modality != "video":
            return super().token_signals(modality, layouts, per_patch)

        def pool(x):  # as apply_pooling: bilinear to ceil(side / 2)
            return torch.nn.functional.interpolate(x, size=[math.ceil(s / 2) for s in x.shape[2:]], mode="bilinear")

        return pooled_frame_signals(layouts, per_patch, pool)

    def pack(self, modality, features):
        if modality == "video":
            # OneVision's forward flattens a batched video tensor; rows of different lengths go in as one.
            joined = torch.cat(list(features), dim=0) if features else None
            return BaseModelOutputWithPooling(pooler_output=joined[None] if joined is not None else None)
        return super().pack(modality, features)
