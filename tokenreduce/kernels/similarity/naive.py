"""Pure-torch pairwise similarity: the CPU fallback and the oracle the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so gradchecks and fp64 oracles stay exact)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalized(x: torch.Tensor, center: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of ``x`` (optionally centred over the last dim) scaled to unit norm, in fp32 (fp64 kept)."""
    x = x.to(dtype or compute_dtype(x))
    if center:
        x = x - x.mean(-1, keepdim=True)
    return F.normalize(x, dim=-1, eps=EPS)


def pairwise_similarity(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    metric: str = "cosine",
    mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    fill: float = float("-inf"),
) -> torch.Tensor:
    dtype = compute_dtype(x, *(() if y is None else (y,)))
    a = normalized(x, metric == "correlation", dtype)
    b = a if y is None else normalized(y, metric == "correlation", dtype)
    sim = a @ b.transpose(-1, -2)
    if y is None:
        y_mask = mask
    if mask is not None or y_mask is not None:
        pair = torch.ones_like(sim, dtype=torch.bool)
        if mask is not None:
            pair = pair & mask[:, :, None]
        if y_mask is not None:
            pair = pair & y_mask[:, None, :]
        sim = torch.where(pair, sim, torch.full_like(sim, fill))
    return sim


def neighbor_count(
    x: torch.Tensor, threshold: float, mask: torch.Tensor | None = None, metric: str = "cosine"
) -> torch.Tensor:
    N = x.shape[1]
    a = normalized(x, metric == "correlation")
    sim = a @ a.transpose(-1, -2)
    close = sim > threshold
    close &= ~torch.eye(N, dtype=torch.bool, device=x.device)
    if mask is not None:
        close &= mask[:, :, None] & mask[:, None, :]
    return close.sum(-1)
