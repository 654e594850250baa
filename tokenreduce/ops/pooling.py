"""Spatial average pooling of a layout segment's grid (``pool``, LangDC's base branch).

A segment (base image, high-resolution canvas, video frame) is pooled on its own grid with
``adaptive_avg_pool2d``; a pooled token is placed at (and takes the position of) the original token at the
centre of its cell, and a pooled row of a canvas that had newline slots keeps one newline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenreduce.core.layout import Segment


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
