"""Triton kernels for pairwise cosine / correlation similarity and the fused neighbour count.

Rows are never normalised in memory: a first kernel computes each row's mean and centred sum of squares,
the tile kernels subtract the mean on load (correlation) and scale the fp32 dot products by the inverse
norms. ``neighbor_count`` thresholds each tile in registers and adds per-row counts atomically (integer
adds, so the result is deterministic); the ``N x N`` matrix never reaches global memory.
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
def _similarity_tile(
    x_ptr, y_ptr, x_mean, x_sumsq, y_mean, y_sumsq, b, N, M, D, sxb, sxn, syb, syn,
    CENTER: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's ``BLOCK_M x BLOCK_N`` tile of cosine / correlation similarities, with its row and
    column indices and their in-range masks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < M
    a_shift = tl.load(x_mean + b * N + rows, mask=row_ok, other=0.0)
    b_shift = tl.load(y_mean + b * M + cols, mask=col_ok, other=0.0)
    a_inv = inv_norm(tl.load(x_sumsq + b * N + rows, mask=row_ok, other=1.0), EPS)
    b_inv = inv_norm(tl.load(y_sumsq + b * M + cols, mask=col_ok, other=1.0), EPS)
    acc = dot_rows(
        x_ptr + b * sxb + rows.to(tl.int64) * sxn, y_ptr + b * syb + cols.to(tl.int64) * syn,
        row_ok, col_ok, a_shift, b_shift, D, CENTER, TO_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    return acc * a_inv[:, None] * b_inv[None, :], rows, cols, row_ok, col_ok


@triton.jit
def _similarity_kernel(
    x_ptr, y_ptr, x_mean, x_sumsq, y_mean, y_sumsq, x_mask, y_mask, out_ptr,
    N, M, D, sxb, sxn, syb, syn, sob, son, fill,
    CENTER: tl.constexpr, HAS_X_MASK: tl.constexpr, HAS_Y_MASK: tl.constexpr,
    TO_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    sim, rows, cols, row_ok, col_ok = _similarity_tile(
        x_ptr, y_ptr, x_mean, x_sumsq, y_mean, y_sumsq, b, N, M, D, sxb, sxn, syb, syn,
        CENTER, TO_FP32, PRECISION, EPS, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    pair = row_ok[:, None] & col_ok[None, :]
    valid = pair
    if HAS_X_MASK:
        valid = valid & (tl.load(x_mask + b * N + rows, mask=row_ok, other=0) != 0)[:, None]
    if HAS_Y_MASK:
        valid = valid & (tl.load(y_mask + b * M + cols, mask=col_ok, other=0) != 0)[None, :]
    sim = tl.where(valid, sim, fill)
    tl.store(out_ptr + b * sob + rows[:, None].to(tl.int64) * son + cols[None, :], sim, mask=pair)


@triton.jit
def _neighbor_count_kernel(
    x_ptr, x_mean, x_sumsq, x_mask, count_ptr,
    N, D, sxb, sxn, threshold,
    CENTER: tl.constexpr, HAS_MASK: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    sim, rows, cols, row_ok, col_ok = _similarity_tile(
        x_ptr, x_ptr, x_mean, x_sumsq, x_mean, x_sumsq, b, N, N, D, sxb, sxn, sxb, sxn,
        CENTER, TO_FP32, PRECISION, EPS, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    hit = (sim > threshold) & row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
    if HAS_MASK:
        hit = hit & (tl.load(x_mask + b * N + rows, mask=row_ok, other=0) != 0)[:, None]
        hit = hit & (tl.load(x_mask + b * N + cols, mask=col_ok, other=0) != 0)[None, :]
    tl.atomic_add(count_ptr + b * N + rows, tl.sum(hit.to(tl.int32), 1), mask=row_ok)


def _blocks(x: torch.Tensor, n: int, m: int, d: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).

    GPU sizes are the largest without register spills on sm_90 (``tests/kernels/aot_compile.py``).
    """
    if for_gpu(x):
        return 64, 64, 32, 8, 3
    return pow2(n, 16, 256), pow2(m, 16, 256), pow2(d, 16, 512), 4, 1


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if mask is None else mask.contiguous().view(torch.uint8)


def pairwise_similarity(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    metric: str = "cosine",
    mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    fill: float = float("-inf"),
) -> torch.Tensor:
    """Triton twin of :func:`tokenreduce.kernels.pairwise_similarity` (inputs already validated)."""
    center = metric == "correlation"
    x = last_dim_contiguous(x)
    x_mean, x_sumsq = row_stats(x, center)
    if y is None:
        y, y_mean, y_sumsq, y_mask = x, x_mean, x_sumsq, mask
    else:
        y = last_dim_contiguous(y)
        y_mean, y_sumsq = row_stats(y, center)
    B, N, D = x.shape
    M = y.shape[1]
    out = torch.empty(B, N, M, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    bm, bn, bd, warps, stages = _blocks(x, N, M, D)
    to_fp32, precision = dot_config(x, y, center)
    launch(
        _similarity_kernel, (triton.cdiv(N, bm), triton.cdiv(M, bn), B),
        x, y, x_mean, x_sumsq, y_mean, y_sumsq, _mask_arg(mask, x_mean), _mask_arg(y_mask, x_mean), out,
        N, M, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        float(fill),
        CENTER=center, HAS_X_MASK=mask is not None, HAS_Y_MASK=y_mask is not None,
        TO_FP32=to_fp32, PRECISION=precision, EPS=EPS,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return out


def neighbor_count(
    x: torch.Tensor, threshold: float, mask: torch.Tensor | None = None, metric: str = "cosine"
) -> torch.Tensor:
    """Triton twin of :func:`tokenreduce.kernels.neighbor_count` (inputs already validated)."""
    center = metric == "correlation"
    x = last_dim_contiguous(x)
    B, N, D = x.shape
    count = torch.zeros(B, N, device=x.device, dtype=torch.int32)
    if count.numel() == 0:
        return count.long()
    x_mean, x_sumsq = row_stats(x, center)
    bm, bn, bd, warps, stages = _blocks(x, N, N, D)
    to_fp32, precision = dot_config(x, x, center)
    launch(
        _neighbor_count_kernel, (triton.cdiv(N, bm), triton.cdiv(N, bn), B),
        x, x_mean, x_sumsq, _mask_arg(mask, x_mean), count,
        N, D, x.stride(0), x.stride(1), float(threshold),
        CENTER=center, HAS_MASK=mask is not None,
        TO_FP32=to_fp32, PRECISION=precision, EPS=EPS,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return count.long()
