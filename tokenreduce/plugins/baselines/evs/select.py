"""EVS's selection, pure: keep the video tokens that changed most since the previous frame.

Each token of frame ``t > 0`` scores ``1 - cos`` against the token at the same place in frame ``t - 1``;
every token of the first frame scores above any of those, so the first frame is kept whole. The ``keep``
best-scored tokens stay (ties to the earlier token). Sizes come from the layout: no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FIRST_FRAME = 255.0  # above any 1 - cos (at most 2): the first frame always stays


def evs_select(features: torch.Tensor, frames: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending, into ``features`` ``[n, D]``) of the ``keep`` tokens of ``frames`` ``[T, P]`` (token
    indices of each frame, in place order) that changed most since the previous frame."""
    x = features[frames.flatten()].view(*frames.shape, -1).float()
    change = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    score = torch.cat([torch.full_like(x[:1, :, 0], FIRST_FRAME), change]).flatten()
    order = torch.sort(score, descending=True, stable=True).indices[:keep]
    return frames.flatten()[order].sort().values
