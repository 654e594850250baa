"""LLaVA-NeXT (anyres crops + ``image_newline``) and LLaVA-NeXT-Video (images and pooled video frames)."""

from __future__ import annotations

from typing import Any

import torch

from tokenreduce.core.layout import Segment, TokenLayout

from .base import Adapter
from .llava import vision_grid_side


def anyres_layouts(adapter: Adapter, inputs: dict[str, Any], pack, num_patches: list[int]) -> list[TokenLayout]:
    """Layouts of anyres images, read off the family's own ``pack_image_features``.

    The model's packing (unpadding, OneVision's downsampling, newline slots) is run on one-dimensional
    stand-in features so the layout always matches the installed transformers version.
    """
    side = vision_grid_side(adapter.config.vision_config)
    image_sizes = inputs["image_sizes"]
    fake = [torch.ones(n, side * side, 1) for n in num_patches]
    packed, _ = pack(fake, image_sizes.cpu() if torch.is_tensor(image_sizes) else image_sizes, torch.full((1,), -1.0))
    layouts = []
    for i, (tokens, n_patches) in enumerate(zip(packed, num_patches)):
        tokens = tokens[:, 0]
        size = tuple(int(v) for v in image_sizes[i])
        if n_patches > 1:
            canvas = tokens[side * side :]
            newlines = (canvas == -1).nonzero().flatten()
            rows = int(newlines.numel())
            cols = int(newlines[0]) if rows else 0
            grid_h, grid_w = _crop_grid(adapter, size)
            segments = (
                Segment("base", side, side),
                Segment("crop", rows, cols, newline=True, crop_grid=(grid_h, grid_w)),
            )
        else:
            has_newline = bool(tokens[-1] == -1)
            segments = (Segment("base", side, side),) + ((Segment("newline", 1, 0, newline=True),) if has_newline else ())
        layout = TokenLayout("image", segments, image_size=size)
        if layout.num_tokens != tokens.numel():  # pragma: no cover - guards against new packing schemes
            layout = TokenLayout.flat("image", tokens.numel())
        layouts.append(layout)
    return layouts


def _crop_grid(adapter: Adapter, image_size: tuple[int, int]) -> tuple[int, int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(
        list(image_size), adapter.config.image_grid_pinpoints, adapter.config.vision_config.image_size
    )


def num_anyres_patches(adapter: Adapter, image_sizes, need_patching: list[bool] | None = None) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    need_patching = need_patching or [True] * len(image_sizes)
    return [
        image_size_to_num_patches(
            image_size=size,
            grid_pinpoints=adapter.config.image_grid_pinpoints,
            patch_size=adapter.config.vision_config.image_size,
        )
        if patch
        else 1
        for size, patch in zip(image_sizes, need_patching)
    ]


class LlavaNextAdapter(Adapter):
    name = "llava_next"
    model_types = ("llava_next",)
    modalities = ("image",)

    def _strategy(self, inputs):
        return inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    def layouts(self, modality, inputs, counts=None):
        if modality == "video":
            return self.video_layouts(inputs)
        num_patches = num_anyres_patches(self, inputs["image_sizes"])

        def pack(features, sizes, newline):
            return self.inner.pack_image_features(
                features, sizes, vision_feature_select_strategy=self._strategy(inputs), image_newline=newline
            )

        return anyres_layouts(self, inputs, pack, num_patches)

    def video_layouts(self, inputs):  # pragma: no cover - overridden by video families
        raise NotImplementedError


class LlavaNextVideoAdapter(LlavaNextAdapter):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    modalities = ("image", "video")

    def video_layouts(self, inputs):
        videos = inputs["pixel_values_videos"]
        num_videos, frames = videos.shape[:2]
        side = videos.shape[-1] // self.config.vision_config.patch_size
        pooled = _pooled_side(self.inner.vision_resampler, side)
        segments = tuple(Segment("frame", pooled, pooled, time=t) for t in range(frames))
        size = tuple(videos.shape[-2:])
        return [TokenLayout("video", segments, image_size=size) for _ in range(num_videos)]


def _pooled_side(resampler, side: int) -> int:
    """Grid side of a frame after LLaVA-NeXT-Video's spatial pooling."""
    pool = resampler.pool
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    kernel = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    return (side - kernel) // stride + 1
