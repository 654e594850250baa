"""Pairwise token similarity (cosine or Pearson correlation) and the fused neighbour count.

Used by duplicate-aware pruning (DART-style), density scores, and merging criteria. Correlation is the
cosine of the vectors centred over their feature dim. Zero vectors (or constant ones under correlation)
have similarity 0 with everything, because norms are clamped at 1e-12 like ``F.normalize``.
"""

from __future__ import annotations

import torch

from tokenreduce.kernels._backend import check_mask, check_tensor, select_backend
from tokenreduce.kernels.similarity import naive

METRICS = ("cosine", "correlation")


def _check_metric(op: str, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"{op}: `metric` must be one of {METRICS}, got {metric!r}")


def pairwise_similarity(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    metric: str = "cosine",
    mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    fill: float = float("-inf"),
) -> torch.Tensor:
    """Similarity of every token of ``x`` with every token of ``y`` (or of ``x`` itself).

    Args:
        x: ``[B, N, D]`` tokens.
        y: ``[B, M, D]`` second token set; ``None`` compares ``x`` with itself (``M = N``, the diagonal is
            each token's self-similarity, 1 for a non-zero vector).
        metric: ``"cosine"`` or ``"correlation"`` (Pearson: centre each vector, then cosine).
        mask: ``[B, N]`` bool, valid tokens of ``x``; ``y_mask``: ``[B, M]`` for ``y`` (with ``y=None``
            the ``mask`` applies to both sides and ``y_mask`` must be ``None``).
        fill: value of every pair with a masked token on either side. The default ``-inf`` keeps masked
            pairs out of any max / top-k / threshold; pass ``0.0`` before summing.

    Returns:
        ``[B, N, M]`` float32 (float64 for float64 inputs on the torch path).
    """
    op = "pairwise_similarity"
    _check_metric(op, metric)
    check_tensor(op, "x", x, 3)
    B, N, D = x.shape
    if y is not None:
        check_tensor(op, "y", y, 3)
        if y.shape[0] != B or y.shape[2] != D:
            raise ValueError(f"{op}: `y` must be [B={B}, M, D={D}], got {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"{op}: `y` is on {y.device} but `x` is on {x.device}; move it there")
    elif y_mask is not None:
        raise ValueError(f"{op}: `y_mask` needs `y`; with y=None `mask` covers both sides")
    check_mask(op, "mask", mask, (B, N), x.device)
    if y is not None:
        check_mask(op, "y_mask", y_mask, (B, y.shape[1]), x.device)
    if select_backend(op, x, y) == "triton":
        from tokenreduce.kernels.similarity import triton as impl
    else:
        impl = naive
    return impl.pairwise_similarity(x, y, metric=metric, mask=mask, y_mask=y_mask, fill=fill)


def neighbor_count(
    x: torch.Tensor, threshold: float, mask: torch.Tensor | None = None, metric: str = "cosine"
) -> torch.Tensor:
    """For each token ``i``, how many OTHER valid tokens ``j`` have ``similarity(i, j) > threshold``.

    The Triton path thresholds tiles in registers and never writes the ``N x N`` matrix.

    Args:
        x: ``[B, N, D]`` tokens.
        threshold: strict lower bound on the similarity (a Python float, compared in fp32).
        mask: ``[B, N]`` bool valid tokens; a masked token counts nobody and is counted by nobody.
        metric: ``"cosine"`` or ``"correlation"``.

    Returns:
        ``[B, N]`` int64 counts (0 for masked tokens).
    """
    op = "neighbor_count"
    _check_metric(op, metric)
    check_tensor(op, "x", x, 3)
    check_mask(op, "mask", mask, tuple(x.shape[:2]), x.device)
    if select_backend(op, x) == "triton":
        from tokenreduce.kernels.similarity import triton as impl
    else:
        impl = naive
    return impl.neighbor_count(x, float(threshold), mask=mask, metric=metric)


__all__ = ["METRICS", "neighbor_count", "pairwise_similarity"]
