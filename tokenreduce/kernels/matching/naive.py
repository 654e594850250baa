"""Pure-torch ToMe bipartite matching scores: the CPU fallback and the oracle for the Triton kernel."""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import normalized


def bipartite_matching(
    metric: torch.Tensor, protect: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    m = normalized(metric, False)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if protect is not None:
        scores = scores.masked_fill(protect[:, 1::2][:, None, :], float("-inf"))
        scores = scores.masked_fill(protect[:, ::2][:, :, None], float("-inf"))
    if scores.shape[-1] == 0:
        shape = scores.shape[:2]
        return (torch.zeros(shape, dtype=torch.long, device=metric.device),
                torch.full(shape, float("-inf"), dtype=scores.dtype, device=metric.device))
    best_score, best_index = scores.max(-1)
    return best_index, best_score
