"""ToMe bipartite soft matching scores (Bolya et al., 2023): which B token each A token would merge into."""

from __future__ import annotations

import torch

from tokenreduce.kernels._backend import check_finite, check_mask, check_tensor, select_backend
from tokenreduce.kernels.matching import naive


def bipartite_matching(
    metric: torch.Tensor,
    *,
    protect_first: bool = False,
    protect: torch.Tensor | None = None,
    assume_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every A token, its most similar B token and their cosine similarity.

    Semantics (as ToMe's ``bipartite_soft_matching`` before its sort/merge step): the ``N`` tokens split
    alternately into ``A = tokens 0, 2, 4, ...`` (``Na = ceil(N/2)``) and ``B = tokens 1, 3, 5, ...``
    (``Nb = floor(N/2)``); ``metric`` is L2-normalised (norm clamped at 1e-12, so a zero vector scores 0
    where ToMe would give NaN) and ``scores = A @ B^T``.

    Protected tokens are never merged: a protected A token gets score ``-inf`` (and index 0), and a
    protected B token is never chosen as a destination (its column is ``-inf``; an A token with no
    allowed destination, e.g. ``N = 1``, gets ``-inf`` and index 0).

    Args:
        metric: ``[B, N, D]`` per-token metric (ToMe uses the attention keys, mean over heads).
        protect_first: protect token 0 (the CLS token, ToMe's ``class_token=True``).
        protect: ``[B, N]`` bool, further protected tokens (e.g. a distillation token, or padding).
        assume_finite: skip the NaN/inf check (and its host sync); for callers that already replaced
            non-finite values, e.g. on the hot path.

    Returns:
        ``(best_index, best_score)``, both ``[B, Na]``: int64 index into B (original token
        ``2 * best_index + 1``; ties go to the lower index) and float32 cosine score.

    Raises:
        ValueError: on NaN/inf in ``metric`` (costs one host sync) unless ``assume_finite``.
    """
    op = "bipartite_matching"
    check_tensor(op, "metric", metric, 3)
    B, N, _ = metric.shape
    check_mask(op, "protect", protect, (B, N), metric.device)
    if not assume_finite:
        check_finite(op, "metric", metric)
    if protect_first and N > 0:
        protect = torch.zeros(B, N, dtype=torch.bool, device=metric.device) if protect is None else protect.clone()
        protect[:, 0] = True
    if select_backend(op, metric) == "triton":
        from tokenreduce.kernels.matching import triton as impl
    else:
        impl = naive
    return impl.bipartite_matching(metric, protect)


__all__ = ["bipartite_matching"]
