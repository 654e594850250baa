"""``pool``: spatial average pooling of each crop / frame grid to a target number of tokens.

Plain downsampling beats many published methods (VTC-Bench). Each segment of the layout (base image,
high-resolution canvas, video frame) is pooled on its own grid with ``adaptive_avg_pool2d``, sharing the
budget in proportion to segment size; a pooled row of a canvas that had newline slots keeps one newline.
A pooled token is placed at (and takes the position of) the original token at the centre of its cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_keep, resolve_keep
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction
from tokenreduce.core.registry import register_method
from tokenreduce.ops.pooling import pool_segment


@dataclass
class PoolConfig(MethodConfig):
    """Options of ``pool``.

    Attributes:
        keep: content tokens kept per item: a count (int >= 1) or a fraction (float in (0, 1]). The pooled
            grids are rounded, so the count reached is close to, not always exactly, the budget.
    """

    keep: int | float = 0.25

    def validate(self) -> None:
        check_keep("keep", self.keep)


@register_method("pool", config_cls=PoolConfig)
class PoolMethod(ProjectorMethod):
    """Spatial average pooling per crop and per frame, keeping newline slots."""

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        layout = context.layout
        content_sizes = [s.rows * s.cols for s in layout.segments]
        total = sum(content_sizes)
        k = resolve_keep(self.config.keep, total)
        feats, sources = [], []
        for seg, sl, size in zip(layout.segments, layout.segment_slices(), content_sizes):
            target = max(1, round(k * size / total)) if size else 0
            f, s = pool_segment(features[sl], seg, sl.start, target)
            feats.append(f)
            sources.append(s)
        return Reduction(sources=torch.cat(sources).to(features.device), features=torch.cat(feats))
