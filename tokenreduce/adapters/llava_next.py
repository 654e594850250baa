"""LLaVA-NeXT (anyres crops + ``image_newline``) and LLaVA-NeXT-Video (images and pooled video frames)."""

from __future__ import annotations

from typing import Any

import torch

from tokenreduce.core.hostsync import host_only
from tokenreduce.core.layout import Segment, TokenLayout

from .base import Adapter
from .llava import vision_grid_side


def anyres_layouts(adapter: Adapter, inputs: dict[str, Any], pack, num_patches: list[int]) -> list[TokenLayout]:
    """Layouts of anyres images, read off the family's own ``pack_image_features``.

    The model's packing (unpadding, OneVision's downsampling, newline slots) is run on stand-in features
    holding each patch's canvas coordinates, so the layout always matches the installed transformers
    version and every packed token knows the tower patch it comes from (``extra["patch_source"]``:
    ``[N, 2]`` crop index within the image, base first, and patch index; ``-1`` for newline slots).
    """
    side = vision_grid_side(adapter.config.vision_config)
    image_sizes = inputs["image_sizes"]
    # One read of the sizes (the model's own anyres path reads them too); everything after runs on
    # host tensors built here.
    listed = host_sizes(adapter, image_sizes)
    sizes = [tuple(int(v) for v in listed[i]) for i in range(len(num_patches))]
    with host_only():
        return _anyres_layouts(adapter, pack, num_patches, side, sizes, torch.tensor(listed))


def _anyres_layouts(adapter: Adapter, pack, num_patches: list[int], side: int, sizes: list[tuple[int, int]],
                    sizes_arg: torch.Tensor) -> list[TokenLayout]:
    fake = []
    for size, n in zip(sizes, num_patches):
        rr, cc = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        grid_w = _crop_grid(adapter, size)[1] if n > 1 else 1
        crops = []
        for c in range(n):
            k = max(c - 1, 0)  # high-resolution crops, row-major over the crop grid
            offset_r, offset_c = (k // grid_w) * side, (k % grid_w) * side
            crops.append(torch.stack([torch.ones(side, side), rr + offset_r, cc + offset_c], dim=-1).view(side * side, 3))
        fake.append(torch.stack(crops).float())
    packed, _ = pack(fake, sizes_arg, torch.full((3,), -1.0))
    layouts = []
    for size, tokens, n_patches in zip(sizes, packed, num_patches):
        is_newline = tokens[:, 0] < 0
        if n_patches > 1:
            canvas_newlines = is_newline[side * side :].nonzero().flatten()
            rows = int(canvas_newlines.numel())
            cols = int(canvas_newlines[0]) if rows else 0
            grid_h, grid_w = _crop_grid(adapter, size)
            segments = (
                Segment("base", side, side),
                Segment("crop", rows, cols, newline=True, crop_grid=(grid_h, grid_w)),
            )
        else:
            grid_w = 1
            segments = (Segment("base", side, side),)
            if bool(is_newline[-1]):
                segments += (Segment("newline", 1, 0, newline=True),)
        coords = tokens[:, 1:].round().long()
        source = torch.full((tokens.shape[0], 2), -1, dtype=torch.long)
        base = slice(0, side * side)
        source[base, 0] = 0
        source[base, 1] = torch.arange(side * side)
        high = torch.zeros(tokens.shape[0], dtype=torch.bool)
        high[side * side :] = ~is_newline[side * side :]
        r, c = coords[high, 0], coords[high, 1]
        source[high, 0] = 1 + (r // side) * grid_w + c // side
        source[high, 1] = (r % side) * side + c % side
        layout = TokenLayout("image", segments, image_size=size,
                             extra={"tower_rows": n_patches, "patch_source": source})
        if layout.num_tokens != tokens.shape[0]:  # pragma: no cover - guards against new packing schemes
            layout = TokenLayout.flat("image", tokens.shape[0])
        layouts.append(layout)
    return layouts


def _crop_grid(adapter: Adapter, image_size: tuple[int, int]) -> tuple[int, int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(
        list(image_size), adapter.config.image_grid_pinpoints, adapter.config.vision_config.image_size
    )


def host_sizes(adapter: Adapter, image_sizes) -> list[list[int]]:
    """``image_sizes`` as Python lists, read from the device once per tensor (the layouts and the patch
    counts both need them; the last tensor read is remembered on the adapter)."""
    if not torch.is_tensor(image_sizes):
        return [[int(v) for v in s] for s in image_sizes]
    memo = getattr(adapter, "_host_sizes", None)
    if memo is None or memo[0] is not image_sizes:
        memo = (image_sizes, image_sizes.tolist())
        adapter._host_sizes = memo
    return memo[1]


def host_image_sizes(adapter: Adapter, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Encoder arguments with ``image_sizes`` as the host lists :func:`host_sizes` read: the model's anyres
    path reads every image's size again (patch counts, crop grid, unpadding), from Python values then."""
    sizes = kwargs.get("image_sizes")
    if torch.is_tensor(sizes):
        kwargs = {**kwargs, "image_sizes": host_sizes(adapter, sizes)}
    return kwargs


def num_anyres_patches(adapter: Adapter, image_sizes, need_patching: list[bool] | None = None) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    image_sizes = host_sizes(adapter, image_sizes)
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
    stages = ("vision", "projector", "llm", "decode")

    def _strategy(self, inputs):
        return inputs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    host_read_modalities = frozenset({"image"})

    def encoder_kwargs(self, modality, kwargs):
        return host_image_sizes(self, kwargs) if modality == "image" else kwargs

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

    def token_signals(self, modality, layouts, per_patch):
        if modality != "video":
            return super().token_signals(modality, layouts, per_patch)
        # Frames go through the resampler's spatial pooling: pool the signal maps the same way.
        pool = self.inner.vision_resampler.pool
        kernel = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        return pooled_frame_signals(layouts, per_patch, lambda x: torch.nn.functional.avg_pool2d(x, kernel))

    def video_layouts(self, inputs):
        videos = inputs["pixel_values_videos"]
        num_videos, frames = videos.shape[:2]
        side = videos.shape[-1] // self.config.vision_config.patch_size
        pooled = _pooled_side(self.inner.vision_resampler, side)
        segments = tuple(Segment("frame", pooled, pooled, time=t) for t in range(frames))
        size = tuple(videos.shape[-2:])
        return [TokenLayout("video", segments, image_size=size) for _ in range(num_videos)]


def pooled_frame_signals(layouts, per_patch: torch.Tensor, pool) -> list[torch.Tensor]:
    """Per video: its frames' ``[P, ...]`` patch signals pooled spatially by ``pool`` and flattened in frame
    order (a trailing newline slot, if the layout has one, gets NaN)."""
    out, row = [], 0
    for layout in layouts:
        frames = sum(1 for s in layout.segments if s.kind == "frame")
        maps = per_patch[row : row + frames].float()
        side = round(maps.shape[1] ** 0.5)
        trailing = maps.shape[2:]
        grid = maps.reshape(frames, side, side, -1).permute(0, 3, 1, 2)
        pooled = pool(grid).permute(0, 2, 3, 1).reshape(-1, *trailing)
        extra = layout.num_tokens - pooled.shape[0]
        if extra > 0:
            pooled = torch.cat([pooled, pooled.new_full((extra, *trailing), float("nan"))])
        out.append(pooled)
        row += frames
    return out


def _pooled_side(resampler, side: int) -> int:
    """Grid side of a frame after LLaVA-NeXT-Video's spatial pooling."""
    pool = resampler.pool
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    kernel = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    return (side - kernel) // stride + 1
