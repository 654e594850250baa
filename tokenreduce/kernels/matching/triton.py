"""Triton kernel for ToMe bipartite matching: per A token, the best cosine match among the B tokens.

A tokens (even positions) and B tokens (odd positions) are read in place with a doubled row stride; one
program owns a block of A tokens and streams the B tokens in tiles with a running arg-max (strictly
greater replaces, lowest index wins within a tile), so the ``Na x Nb`` score matrix is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenreduce.kernels._triton_utils import (
    EPS,
    dot_config,
    dot_rows,
    for_gpu,
    inv_norm,
    last_dim_contiguous,
    launch,
    pow2,
    row_stats,
)


@triton.jit
def _matching_kernel(
    m_ptr, sumsq_ptr, protect_ptr, idx_ptr, score_ptr,
    N, Na, Nb, D, smb, smn,
    HAS_PROTECT: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr, EPS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    ia = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = ia < Na
    a_tok = 2 * ia
    base = m_ptr + b * smb
    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for j0 in range(0, Nb, BLOCK_B):
        jb = j0 + tl.arange(0, BLOCK_B)
        b_ok = jb < Nb
        b_tok = 2 * jb + 1
        acc = dot_rows(base + a_tok.to(tl.int64) * smn, base + b_tok.to(tl.int64) * smn, a_ok, b_ok,
                       0.0, 0.0, D, False, TO_FP32, PRECISION, BLOCK_A, BLOCK_B, BLOCK_D)
        b_inv = inv_norm(tl.load(sumsq_ptr + b * N + b_tok, mask=b_ok, other=1.0), EPS)
        target = b_ok
        if HAS_PROTECT:
            target = target & (tl.load(protect_ptr + b * N + b_tok, mask=b_ok, other=1) == 0)
        score = tl.where(target[None, :], acc * b_inv[None, :], float("-inf"))
        tile_best, tile_idx = tl.max(score, 1, return_indices=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + j0, best_idx)
    best = best * inv_norm(tl.load(sumsq_ptr + b * N + a_tok, mask=a_ok, other=1.0), EPS)
    if HAS_PROTECT:
        protected = tl.load(protect_ptr + b * N + a_tok, mask=a_ok, other=0) != 0
        best = tl.where(protected, float("-inf"), best)
        best_idx = tl.where(protected, 0, best_idx)
    tl.store(idx_ptr + b * Na + ia, best_idx.to(tl.int64), mask=a_ok)
    tl.store(score_ptr + b * Na + ia, best, mask=a_ok)


def bipartite_matching(
    metric: torch.Tensor, protect: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`tokenreduce.kernels.bipartite_matching` (validated inputs)."""
    metric = last_dim_contiguous(metric)
    B, N, D = metric.shape
    Na, Nb = (N + 1) // 2, N // 2
    index = torch.zeros(B, Na, dtype=torch.long, device=metric.device)
    score = torch.full((B, Na), float("-inf"), dtype=torch.float32, device=metric.device)
    if B == 0 or Na == 0:
        return index, score
    sumsq = row_stats(metric, False)[1]
    protect_arg = sumsq if protect is None else protect.contiguous().view(torch.uint8)
    if for_gpu(metric):
        ba, bb, bd, warps, stages = 64, 64, 32, 8, 3
    else:
        ba, bb, bd, warps, stages = pow2(Na, 16, 256), pow2(Nb, 16, 256), pow2(D, 16, 512), 4, 1
    to_fp32, precision = dot_config(metric, metric)
    launch(
        _matching_kernel, (triton.cdiv(Na, ba), B),
        metric, sumsq, protect_arg, index, score, N, Na, Nb, D, metric.stride(0), metric.stride(1),
        HAS_PROTECT=protect is not None, TO_FP32=to_fp32, PRECISION=precision, EPS=EPS,
        BLOCK_A=ba, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return index, score
