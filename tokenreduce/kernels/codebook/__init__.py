"""Nearest-codeword assignment for vector-quantised visual tokens, distance and arg-min fused."""

from __future__ import annotations

import torch

from tokenreduce.kernels._backend import check_finite, check_tensor, select_backend
from tokenreduce.kernels.codebook import naive

CODEBOOK_METRICS = ("l2", "cosine")


def codebook_assign(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every vector of ``x``.

    Args:
        x: ``[..., D]`` vectors (e.g. ``[frames, tokens, D]``), any float dtype.
        codebook: ``[K, D]`` codewords, ``K >= 1``.
        metric: ``"l2"``: minimise the squared euclidean distance; ``"cosine"``: maximise the cosine
            similarity (inputs need not be normalised; zero vectors have similarity 0).

    Returns:
        ``(index, value)`` of shape ``x.shape[:-1]``: int64 codeword index (ties go to the lower index)
        and float32 squared distance (clamped at 0) or cosine similarity.

    Raises:
        ValueError: on NaN/inf inputs (no meaningful nearest codeword; costs one host sync).
    """
    op = "codebook_assign"
    if metric not in CODEBOOK_METRICS:
        raise ValueError(f"{op}: `metric` must be one of {CODEBOOK_METRICS}, got {metric!r}")
    check_tensor(op, "codebook", codebook, 2)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{op}: `x` must be a float tensor [..., D]")
    K, D = codebook.shape
    if K == 0 or x.shape[-1] != D:
        raise ValueError(f"{op}: need x [..., D] and codebook [K >= 1, D], got {tuple(x.shape)} and {(K, D)}")
    check_finite(op, "x", x)
    check_finite(op, "codebook", codebook)
    lead = x.shape[:-1]
    flat = x.reshape(-1, D)
    if select_backend(op, flat, codebook) == "triton":
        from tokenreduce.kernels.codebook import triton as impl
    else:
        impl = naive
    index, value = impl.codebook_assign(flat, codebook, metric)
    return index.reshape(lead), value.reshape(lead)


__all__ = ["CODEBOOK_METRICS", "codebook_assign"]
