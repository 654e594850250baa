"""Spatial average pooling of a layout segment's grid (``pool``, LangDC's base branch).

A segment (base image, high-resolution canvas, video frame) is pooled on its own grid with
``adaptive_avg_pool2d``; a pooled token is placed at (and takes the position of) the original token at the
centre of its cell, and a pooled row of a canvas that had newline slots keeps one newline.

Which cells, centres and newline rows a segment pools to depends only on the layout and the budget, so
:class:`PoolPlan` works them out once; applying a plan runs only the pooling itself on the features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenreduce.core.layout import Segment, TokenLayout


def pooled_grid(rows: int, cols: int, target: int) -> tuple[int, int]:
    """Grid of about ``target`` cells with the aspect ratio of ``rows x cols``."""
    target = max(1, min(target, rows * cols))
    scale = math.sqrt(target / (rows * cols))
    h = max(1, min(rows, round(rows * scale)))
    w = max(1, min(cols, round(target / h)))
    return h, w


def _bins(size: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(out)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    return start, end


def pool_segment(x: torch.Tensor, seg: Segment, offset: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool one segment's ``[num_tokens, D]`` features; returns (features, source indices)."""
    if seg.cols == 0:  # a lone newline slot: keep it
        return x, torch.arange(offset, offset + x.shape[0])
    width = seg.cols + int(seg.newline)
    grid = x.view(seg.rows, width, -1)
    h, w = pooled_grid(seg.rows, seg.cols, target)
    content = grid[:, : seg.cols].permute(2, 0, 1)
    pooled = F.adaptive_avg_pool2d(content.float(), (h, w)).to(x.dtype)  # [D, h, w]
    rs, re = _bins(seg.rows, h)
    cs, ce = _bins(seg.cols, w)
    center_r, center_c = (rs + re - 1) // 2, (cs + ce - 1) // 2
    src = offset + center_r[:, None] * width + center_c[None, :]  # [h, w]
    feats = pooled.permute(1, 2, 0)  # [h, w, D]
    if seg.newline:
        newline_src = offset + center_r * width + seg.cols
        src = torch.cat([src, newline_src[:, None]], dim=1)
        feats = torch.cat([feats, grid[center_r, seg.cols][:, None]], dim=1)
    return feats.reshape(-1, x.shape[-1]), src.reshape(-1)


class PoolPlan:
    """What ``pool`` does to one layout at one budget, worked out once: each segment's pooled grid, the
    source index of every output token and the rows whose newline slot is kept.

    :meth:`apply` gives the same features and sources as :func:`pool_segment` over the segments (the same
    pooling ops on the features), without recomputing the bins; index tensors are kept per device, so
    reusing a plan copies nothing to the device.
    """

    def __init__(self, layout: TokenLayout, keep: int):
        """Plan pooling ``layout``'s content tokens to about ``keep`` (shared in proportion to segment size)."""
        content = [s.rows * s.cols for s in layout.segments]
        total = sum(content)
        # per segment: (token slice, rows, cols, width, pooled (h, w) or None for a lone newline,
        # index of the newline rows kept or None)
        self._steps: list[tuple[slice, int, int, int, tuple[int, int] | None, torch.Tensor | None]] = []
        sources = []
        for seg, sl, size in zip(layout.segments, layout.segment_slices(), content):
            width = seg.cols + int(seg.newline)
            if seg.cols == 0:
                self._steps.append((sl, seg.rows, seg.cols, width, None, None))
                sources.append(torch.arange(sl.start, sl.stop))
                continue
            target = max(1, round(keep * size / total)) if size else 0
            h, w = pooled_grid(seg.rows, seg.cols, target)
            rs, re = _bins(seg.rows, h)
            cs, ce = _bins(seg.cols, w)
            center_r, center_c = (rs + re - 1) // 2, (cs + ce - 1) // 2
            src = sl.start + center_r[:, None] * width + center_c[None, :]
            if seg.newline:
                src = torch.cat([src, (sl.start + center_r * width + seg.cols)[:, None]], dim=1)
            self._steps.append((sl, seg.rows, seg.cols, width, (h, w), center_r if seg.newline else None))
            sources.append(src.reshape(-1))
        self._sources = torch.cat(sources)
        self._on_device: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        got = self._on_device.get(device)
        if got is None:
            rows = [None if step[5] is None else step[5].to(device) for step in self._steps]
            got = self._on_device[device] = (self._sources.to(device), rows)
        return got

    def apply(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool one item's ``[N, D]`` features; returns (features ``[M, D]``, source indices ``[M]``)."""
        sources, newline_rows = self._indices(features.device)
        dim = features.shape[-1]
        feats = []
        for (sl, rows, cols, width, grid_size, _), kept_rows in zip(self._steps, newline_rows):
            x = features[sl]
            if grid_size is None:
                feats.append(x)
                continue
            grid = x.view(rows, width, -1)
            pooled = F.adaptive_avg_pool2d(grid[:, :cols].permute(2, 0, 1).float(), grid_size).to(x.dtype)
            out = pooled.permute(1, 2, 0)  # [h, w, D]
            if kept_rows is not None:
                out = torch.cat([out, grid[:, cols].index_select(0, kept_rows)[:, None]], dim=1)
            feats.append(out.reshape(-1, dim))
        return torch.cat(feats), sources
