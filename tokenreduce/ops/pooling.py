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
    source index of every output token, and where each output token lies among the pooled cells and kept
    newline slots.

    :meth:`apply` gives the same features and sources as :func:`pool_segment` over the segments (the same
    pooling ops on the features), without recomputing the bins: it pools each segment, lays the pooled
    cells and newline slots side by side and picks the output order with one gather. Index tensors are kept
    per device, so reusing a plan copies nothing to the device.
    """

    def __init__(self, layout: TokenLayout, keep: int):
        """Plan pooling ``layout``'s content tokens to about ``keep`` (shared in proportion to segment size)."""
        content = [s.rows * s.cols for s in layout.segments]
        total = sum(content)
        # per segment: (token slice, rows, cols, width, pooled (h, w) or None for a lone newline)
        self._steps: list[tuple[slice, int, int, int, tuple[int, int] | None]] = []
        sources, order, column = [], [], 0
        for seg, sl, size in zip(layout.segments, layout.segment_slices(), content):
            width = seg.cols + int(seg.newline)
            if seg.cols == 0:  # a lone newline slot: kept
                self._steps.append((sl, seg.rows, seg.cols, width, None))
                sources.append(torch.arange(sl.start, sl.stop))
                order.append(torch.arange(column, column + seg.num_tokens))
                column += seg.num_tokens
                continue
            target = max(1, round(keep * size / total)) if size else 0
            h, w = pooled_grid(seg.rows, seg.cols, target)
            rs, re = _bins(seg.rows, h)
            cs, ce = _bins(seg.cols, w)
            center_r, center_c = (rs + re - 1) // 2, (cs + ce - 1) // 2
            src = sl.start + center_r[:, None] * width + center_c[None, :]  # [h, w]
            cells = column + torch.arange(h * w).view(h, w)  # the pooled cells, then the segment's newlines
            if seg.newline:
                src = torch.cat([src, (sl.start + center_r * width + seg.cols)[:, None]], dim=1)
                cells = torch.cat([cells, (column + h * w + center_r)[:, None]], dim=1)
            self._steps.append((sl, seg.rows, seg.cols, width, (h, w)))
            sources.append(src.reshape(-1))
            order.append(cells.reshape(-1))
            column += h * w + (seg.rows if seg.newline else 0)
        self._sources = torch.cat(sources)
        self._order = torch.cat(order)
        # the side-by-side parts are already in output order unless a grid row ends in a newline slot
        self._in_order = not any(s.newline and s.cols for s in layout.segments)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._on_device.get(device)
        if got is None:
            got = self._on_device[device] = (self._sources.to(device), self._order.to(device))
        return got

    def apply(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool one item's ``[N, D]`` features; returns (features ``[M, D]``, source indices ``[M]``)."""
        sources, order = self._indices(features.device)
        parts = []  # [D, n] each: pooled cells in raster order, then the segment's newline slots
        for sl, rows, cols, width, grid_size in self._steps:
            x = features[sl]
            if grid_size is None:
                parts.append(x.t())
                continue
            grid = x.view(rows, width, -1)
            pooled = F.adaptive_avg_pool2d(grid[:, :cols].permute(2, 0, 1).float(), grid_size).to(x.dtype)
            parts.append(pooled.flatten(1))
            if width > cols:
                parts.append(grid[:, cols].t())
        # a lone pooled part is a fresh tensor; anything else is joined (and so copied off the input)
        side_by_side = parts[0] if len(parts) == 1 and self._steps[0][4] is not None else torch.cat(parts, dim=1)
        if not self._in_order:
            side_by_side = side_by_side.index_select(1, order)
        return side_by_side.t().contiguous(), sources
