"""Pieces shared by the Triton launchers. Imports Triton: only the ``triton.py`` modules import this.

* :func:`launch` runs a kernel; a hook can intercept launches so a checker can compile every kernel, with
  the block sizes the launchers pick for a GPU, ahead of time for a GPU target (``tests/kernels``).
* :func:`for_gpu` tells a launcher to pick GPU block sizes (CUDA tensors) or interpreter ones (CPU
  tensors under ``TRITON_INTERPRET=1``, where few large programs run fastest).
* :func:`row_stats`: per-row mean and centred sum of squares, the normalisation every cosine /
  correlation kernel needs, so no normalised copy of the input is ever written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

# Norms are clamped like torch.nn.functional.normalize: x / max(||x||, EPS).
EPS = 1e-12

# Set by the ahead-of-time compile check: receives (kernel, grid, args, constexprs, num_warps, num_stages)
# instead of the kernel being launched.
LAUNCH_HOOK: Callable[..., Any] | None = None
FORCE_GPU_CONFIG = False
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def for_gpu(t: torch.Tensor) -> bool:
    """Whether block sizes should be chosen for a GPU rather than for the CPU interpreter."""
    return t.is_cuda or FORCE_GPU_CONFIG


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int = 4, num_stages: int = 2,
           **constexprs: Any) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` (or hand it to :data:`LAUNCH_HOOK`).

    Raises:
        ValueError: when the grid exceeds CUDA's limits (2**31 - 1 programs on axis 0, 65535 on axes 1
            and 2), naming the kernel and the limit, instead of a launch failure deep inside Triton.
    """
    for axis, size in enumerate(grid):
        limit = GRID_LIMITS[axis]
        if size > limit:
            raise ValueError(
                f"{kernel.fn.__name__}: grid axis {axis} needs {size} programs, over CUDA's limit of {limit}; "
                "split the batch (or the row count) into smaller calls"
            )
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kernel, grid, args, constexprs, num_warps, num_stages)
        return
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)


def dot_config(a: torch.Tensor, b: torch.Tensor, center: bool = False) -> tuple[bool, str]:
    """``(TO_FP32, PRECISION)`` for ``tl.dot`` on rows of ``a`` and ``b``; every choice but 3xTF32 is exact
    per product.

    * same half dtype, no centring: native fp16/bf16 tensor-core dot, fp32 accumulation. Except bf16 in
      the interpreter, whose bf16 dot multiplies raw bit patterns (triton#11584): cast to fp32 there.
    * fp16/bf16 cast to fp32: TF32 holds every fp16/bf16 value exactly, so TF32 is exact and fast.
    * centred values (no longer TF32-representable) on a GPU: 3xTF32, each operand split into a TF32 high
      part and a TF32 remainder, three tensor-core products: about fp32's accuracy (relative error ~2^-21)
      at a few times the TF32 speed, where IEEE fp32 ``tl.dot`` ran 5x slower than cuBLAS (H200, 2880 x
      4096 bf16 tokens: 9.7 ms vs 1.8 ms for the torch twin).
    * fp32 inputs, or centred values in the interpreter: IEEE fp32.
    """
    half = (torch.float16, torch.bfloat16)
    if center and for_gpu(a):
        return True, "tf32x3"
    if center or a.dtype not in half or b.dtype not in half:
        return True, "ieee"
    if a.dtype == b.dtype and (a.dtype == torch.float16 or for_gpu(a)):
        return False, "tf32"
    return True, "tf32"


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """Next power of two of ``n``, clamped to ``[lo, hi]``; ``lo=16`` keeps ``tl.dot`` operands legal."""
    p = max(lo, triton.next_power_of_2(max(1, n)))
    return p if hi is None else min(p, hi)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _row_stats_kernel(
    x_ptr, mean_ptr, sumsq_ptr,
    R, N, D, stride_b, stride_n,
    CENTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = x_ptr + (rows // N).to(tl.int64) * stride_b + (rows % N).to(tl.int64) * stride_n
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    if CENTER:
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (cols < D)[None, :]
            total += tl.sum(tl.load(base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32), 1)
        mean = total / D
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        v = tl.load(base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]
        v = tl.where(ok, v, 0.0)
        sumsq += tl.sum(v * v, 1)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(sumsq_ptr + rows, sumsq, mask=row_ok)


def row_stats(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, sumsq)`` of each row of ``x: [B, N, D]`` (last dim contiguous), both ``[B, N]`` fp32.

    ``mean`` is zero when ``center`` is false; ``sumsq`` is the sum of squares after centring.
    """
    B, N, D = x.shape
    mean = torch.empty(B, N, device=x.device, dtype=torch.float32)
    sumsq = torch.empty_like(mean)
    R = B * N
    if R == 0:
        return mean, sumsq
    if for_gpu(x):
        block_r, block_d, warps = 16, pow2(D, 16, 256), 4
    else:
        block_r, block_d, warps = pow2(R, 1, 256), pow2(D, 16, 1024), 4
    launch(
        _row_stats_kernel, (triton.cdiv(R, block_r),),
        x, mean, sumsq, R, N, D, x.stride(0), x.stride(1),
        CENTER=center, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return mean, sumsq


@triton.jit
def dot_rows(
    a_rows, b_rows, a_ok, b_ok, a_shift, b_shift, D,
    CENTER: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` fp32 dot products of the rows starting at pointers ``a_rows`` and ``b_rows``.

    With ``CENTER`` the rows have ``a_shift`` / ``b_shift`` subtracted (in fp32) first. ``TO_FP32`` casts
    the operands to fp32 before ``tl.dot`` (see :func:`dot_config`); otherwise fp16/bf16 tiles go to the
    tensor cores as they are, with fp32 accumulation.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a_m = a_ok[:, None] & d_ok[None, :]
        b_m = b_ok[:, None] & d_ok[None, :]
        a = tl.load(a_rows[:, None] + d[None, :], mask=a_m, other=0.0)
        b = tl.load(b_rows[:, None] + d[None, :], mask=b_m, other=0.0)
        if CENTER:
            a = tl.where(a_m, a.to(tl.float32) - a_shift[:, None], 0.0)
            b = tl.where(b_m, b.to(tl.float32) - b_shift[:, None], 0.0)
        elif TO_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def inv_norm(sumsq, EPS: tl.constexpr):
    """``1 / max(sqrt(sumsq), EPS)``: the scale ``F.normalize`` applies."""
    return 1.0 / tl.maximum(tl.sqrt(sumsq), EPS)
