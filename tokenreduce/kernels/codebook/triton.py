"""Triton kernel for nearest-codeword assignment: distance tiles and the running arg-min in one pass.

One program owns a block of input rows and streams the codebook in tiles; the ``[rows, K]`` distance
matrix never reaches global memory. L2 uses ``||c||^2 - 2 x.c`` per tile (``||x||^2`` is added after the
arg-min, it does not change it); cosine scales the dot products by the codewords' inverse norms and the
input's inverse norm last. A later tile replaces the running best only when strictly better, and within a
tile the lowest index wins, so ties go to the lower codeword index.
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
def _codebook_kernel(
    x_ptr, c_ptr, x_sumsq, c_sumsq, idx_ptr, val_ptr,
    N, K, D, sxn, scn,
    COSINE: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr, EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if COSINE:
        best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    else:
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = dot_rows(x_ptr + rows.to(tl.int64) * sxn, c_ptr + cols.to(tl.int64) * scn, row_ok, col_ok,
                       0.0, 0.0, D, False, TO_FP32, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        c_sq = tl.load(c_sumsq + cols, mask=col_ok, other=1.0)
        if COSINE:
            score = tl.where(col_ok[None, :], acc * inv_norm(c_sq, EPS)[None, :], float("-inf"))
            tile_best, tile_idx = tl.max(score, 1, return_indices=True)
            better = tile_best > best
        else:
            score = tl.where(col_ok[None, :], c_sq[None, :] - 2.0 * acc, float("inf"))
            tile_best, tile_idx = tl.min(score, 1, return_indices=True)
            better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + k0, best_idx)
    x_sq = tl.load(x_sumsq + rows, mask=row_ok, other=0.0)
    if COSINE:
        value = best * inv_norm(x_sq, EPS)
    else:
        value = tl.maximum(best + x_sq, 0.0)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(val_ptr + rows, value, mask=row_ok)


def codebook_assign(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`tokenreduce.kernels.codebook_assign` for ``x: [N, D]`` (validated)."""
    x = last_dim_contiguous(x)
    codebook = last_dim_contiguous(codebook)
    N, D = x.shape
    K = codebook.shape[0]
    index = torch.empty(N, dtype=torch.long, device=x.device)
    value = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return index, value
    x_sumsq = row_stats(x[None], False)[1]
    c_sumsq = row_stats(codebook[None], False)[1]
    if for_gpu(x):
        # Largest tiles without register spills on sm_90 (tests/kernels/aot_compile.py).
        if x.dtype == codebook.dtype == torch.float32:
            bn, bk, bd, warps, stages = 64, 16, 32, 4, 3
        else:
            bn, bk, bd, warps, stages = 64, pow2(K, 16, 32), 32, 8, 3
    else:
        bn, bk, bd, warps, stages = pow2(N, 16, 256), pow2(K, 16, 256), pow2(D, 16, 512), 4, 1
    to_fp32, precision = dot_config(x, codebook)
    launch(
        _codebook_kernel, (triton.cdiv(N, bn),),
        x, codebook, x_sumsq, c_sumsq, index, value, N, K, D, x.stride(0), codebook.stride(0),
        COSINE=metric == "cosine", TO_FP32=to_fp32, PRECISION=precision,
        EPS=EPS, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return index, value
