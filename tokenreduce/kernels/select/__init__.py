"""Per-row token selection: top-k with a budget per row, or everything above a per-row threshold.

Both return a :class:`Selection`: the kept indices in ORIGINAL (ascending) order, padded with -1, and the
``[B, N]`` keep mask. Ties are broken by index (the lower index is kept), identically on both backends.
NaN scores rank above ``+inf`` in top-k (as in ``torch.sort``/``torch.topk``) and never pass a threshold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tokenreduce.kernels._backend import check_mask, check_tensor, select_backend
from tokenreduce.kernels.select import naive


class Selection(NamedTuple):
    """Kept tokens of each row.

    Attributes:
        indices: ``[B, W]`` int64 kept positions, ascending, padded with -1 on the right.
        keep: ``[B, N]`` bool, True where a token is kept.
    """

    indices: torch.Tensor
    keep: torch.Tensor


def _per_row(value: torch.Tensor | float | int, B: int, device: torch.device, dtype: torch.dtype,
             name: str, op: str) -> torch.Tensor:
    # a Python number is made a tensor of ``dtype`` directly: through float32 first, a float64 threshold
    # would lose its low bits
    t = torch.as_tensor(value, device=device, dtype=None if torch.is_tensor(value) else dtype)
    if t.dim() == 0:
        t = t.expand(B)
    if tuple(t.shape) != (B,):
        raise ValueError(f"{op}: `{name}` must be a scalar or have shape [{B}], got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def topk_select(scores: torch.Tensor, k: torch.Tensor | int, mask: torch.Tensor | None = None) -> Selection:
    """Keep the ``k[b]`` highest-scoring valid tokens of each row ``b``.

    Args:
        scores: ``[B, N]`` float scores (higher is kept first).
        k: budget per row, an int or an integer tensor ``[B]``; must be ``>= 0``. A budget above the
            number of valid tokens keeps all of them.
        mask: ``[B, N]`` bool, tokens that may be kept.

    Returns:
        :class:`Selection` with ``indices`` of width ``min(max(k), N)``. Costs one host sync (the width).
    """
    op = "topk_select"
    check_tensor(op, "scores", scores, 2)
    B, N = scores.shape
    check_mask(op, "mask", mask, (B, N), scores.device)
    integer = (not k.is_floating_point() and not k.is_complex()) if torch.is_tensor(k) else isinstance(k, int)
    if not integer:
        raise ValueError(f"{op}: `k` must be an int or an integer tensor, got {getattr(k, 'dtype', k)!r}")
    kt = _per_row(k, B, scores.device, torch.long, "k", op)
    lo_hi = torch.stack([kt.min(), kt.max()]).tolist() if B else [0, 0]
    if lo_hi[0] < 0:
        raise ValueError(f"{op}: `k` must be >= 0, got min {lo_hi[0]}")
    kt = kt.clamp_max(N)
    width = min(lo_hi[1], N)
    if select_backend(op, scores) == "triton":
        from tokenreduce.kernels.select import triton as impl
    else:
        impl = naive
    return Selection(*impl.topk_select(scores, kt, mask, width))


def threshold_select(
    scores: torch.Tensor, thresholds: torch.Tensor | float, mask: torch.Tensor | None = None
) -> Selection:
    """Keep the valid tokens whose score is strictly above their row's threshold.

    Args:
        scores: ``[B, N]`` float scores.
        thresholds: a float or a ``[B]`` tensor; compared in float32 (float64 for float64 scores on the
            torch path).
        mask: ``[B, N]`` bool, tokens that may be kept.

    Returns:
        :class:`Selection` with ``indices`` as wide as the fullest row. Costs one host sync (the width).
    """
    op = "threshold_select"
    check_tensor(op, "scores", scores, 2)
    B, N = scores.shape
    check_mask(op, "mask", mask, (B, N), scores.device)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    thr = _per_row(thresholds, B, scores.device, dtype, "thresholds", op)
    if select_backend(op, scores) == "triton":
        from tokenreduce.kernels.select import triton as impl
    else:
        impl = naive
    return Selection(*impl.threshold_select(scores, thr, mask))


__all__ = ["Selection", "threshold_select", "topk_select"]
