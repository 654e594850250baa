"""Pure-torch top-k / threshold selection: the CPU fallback and the oracle for the Triton kernel."""

from __future__ import annotations

import torch


def indices_from_keep(keep: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` int64: the kept positions of each row in ascending order, padded with -1."""
    B, N = keep.shape
    pos = keep.long().cumsum(1) - 1
    out = torch.full((B, width + 1), -1, dtype=torch.long, device=keep.device)
    # Dropped positions all write into the spare last column, which is cut off.
    slot = torch.where(keep, pos, torch.full_like(pos, width)).clamp_max(width)
    src = torch.arange(N, device=keep.device).expand(B, N)
    out.scatter_(1, slot, torch.where(keep, src, torch.full_like(src, -1)))
    return out[:, :width].contiguous()


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype where ``-0.0 == 0.0`` and NaN ranks above +inf, like ``torch.sort``."""
    return scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)


def topk_select(
    scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    B, N = scores.shape
    s = _ranked(scores)
    # Stable descending sort: equal scores keep index order, so the lower index wins a tie.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    if mask is not None:
        # Then move masked tokens behind every valid one, keeping the score order within each group.
        invalid = (~mask).gather(1, order).to(torch.uint8)
        order = order.gather(1, torch.sort(invalid, dim=1, stable=True).indices)
        k = torch.minimum(k, mask.sum(1))
    ranks = torch.arange(N, device=scores.device).expand(B, N)
    keep = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order, ranks < k[:, None])
    return indices_from_keep(keep, width), keep


def threshold_select(
    scores: torch.Tensor, thresholds: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    s = _ranked(scores)
    keep = s > thresholds.to(s.dtype)[:, None]
    if mask is not None:
        keep &= mask
    width = int(keep.sum(1).max()) if keep.numel() else 0
    return indices_from_keep(keep, width), keep
