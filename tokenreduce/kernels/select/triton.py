"""Triton kernels for per-row top-k (variable budgets) and threshold selection, in index order.

Top-k without sorting: scores become order-preserving int32 keys (``-0.0`` folded into ``+0.0``, every
NaN above ``+inf`` as in ``torch.sort``, masked tokens a sentinel below everything). One program per row
bisects the 2**32 key range for the k-th largest key ``T`` (32 counting passes), keeps every key above
``T`` and the first ``k - #(key > T)`` keys equal to ``T`` in index order (lower index wins ties), and a
prefix sum over the keep mask scatters the kept positions, already ascending, into the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenreduce.kernels._triton_utils import for_gpu, launch, pow2


@triton.jit
def _keys_kernel(s_ptr, mask_ptr, key_ptr, N, ssb, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    s = tl.load(s_ptr + b * ssb + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their magnitude bits.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(s != s, 0x7FFFFFFF, key)
    valid = ok
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b * N + offs, mask=ok, other=0) != 0)
    # INT32_MIN is no float's key (it would be a NaN, mapped above): it marks masked tokens.
    key = tl.where(valid, key, -2147483647 - 1)
    tl.store(key_ptr + b * N + offs, key, mask=ok)


@triton.jit
def _select_kernel(
    s_ptr, key_ptr, k_ptr, thr_ptr, mask_ptr, keep_ptr, idx_ptr,
    N, ssb, sib,
    TOPK: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    invalid = -2147483647 - 1
    top = tl.full([], 0, tl.int64)
    room = tl.full([], 0, tl.int64)
    thr = 0.0
    if TOPK:
        k = tl.load(k_ptr + b)
        # Largest T with #(key >= T) >= k, by bisection over the int32 range.
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            count = tl.full([], 0, tl.int64)
            for n0 in range(0, N, BLOCK_N):
                offs = n0 + tl.arange(0, BLOCK_N)
                key = tl.load(key_ptr + b * N + offs, mask=offs < N, other=invalid)
                count += tl.sum(((key >= mid) & (key != invalid)).to(tl.int64), 0)
            fits = count >= k
            lo = tl.where(fits, mid, lo)
            hi = tl.where(fits, hi, mid - 1)
        top = lo
        above = tl.full([], 0, tl.int64)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            key = tl.load(key_ptr + b * N + offs, mask=offs < N, other=invalid)
            above += tl.sum(((key > top) & (key != invalid)).to(tl.int64), 0)
        room = k - above
    else:
        thr = tl.load(thr_ptr + b)
    ties = tl.full([], 0, tl.int64)
    kept = tl.full([], 0, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < N
        if TOPK:
            key = tl.load(key_ptr + b * N + offs, mask=ok, other=invalid)
            valid = key != invalid
            tie = valid & (key == top)
            tie_rank = ties + tl.cumsum(tie.to(tl.int64), 0)
            keep = valid & ((key > top) | (tie & (tie_rank <= room)))
            ties += tl.sum(tie.to(tl.int64), 0)
        else:
            s = tl.load(s_ptr + b * ssb + offs, mask=ok, other=0.0).to(tl.float32)
            keep = ok & (s > thr)
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + b * N + offs, mask=ok, other=0) != 0)
        pos = kept + tl.cumsum(keep.to(tl.int64), 0) - 1
        tl.store(keep_ptr + b * N + offs, keep.to(tl.uint8), mask=ok)
        tl.store(idx_ptr + b * sib + pos, offs.to(tl.int64), mask=keep)
        kept += tl.sum(keep.to(tl.int64), 0)


def _block(scores: torch.Tensor, N: int, block_n: int | None) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)``; ``block_n`` overrides the size (tests use it to force several chunks)."""
    if block_n is not None:
        return pow2(block_n, 16), 4
    if for_gpu(scores):
        block = pow2(N, 128, 4096)
        return block, 16 if block == 4096 else 8
    return pow2(N, 16, 1 << 16), 4


def topk_select(
    scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, width: int, block_n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of the top-k selection (validated inputs, ``0 <= k <= N``, ``width = max(k)``)."""
    B, N = scores.shape
    keep = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    idx = torch.full((B, width), -1, dtype=torch.long, device=scores.device)
    if B == 0 or N == 0:
        return idx, keep
    keys = torch.empty(B, N, dtype=torch.int32, device=scores.device)
    mask_arg = keys if mask is None else mask.contiguous().view(torch.uint8)
    block, warps = _block(scores, N, block_n)
    launch(_keys_kernel, (triton.cdiv(N, block), B), scores, mask_arg, keys, N, scores.stride(0),
           HAS_MASK=mask is not None, BLOCK_N=block, num_warps=warps)
    launch(_select_kernel, (B,), scores, keys, k.contiguous(), keys, mask_arg, keep.view(torch.uint8), idx,
           N, scores.stride(0), idx.stride(0), TOPK=True, HAS_MASK=mask is not None, BLOCK_N=block,
           num_warps=warps)
    return idx, keep


def threshold_select(
    scores: torch.Tensor, thresholds: torch.Tensor, mask: torch.Tensor | None, block_n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of the threshold selection (validated inputs, ``thresholds`` float32 ``[B]``)."""
    B, N = scores.shape
    keep = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    idx = torch.full((B, N), -1, dtype=torch.long, device=scores.device)
    if B == 0 or N == 0:
        return idx, keep
    mask_arg = thresholds if mask is None else mask.contiguous().view(torch.uint8)
    block, warps = _block(scores, N, block_n)
    launch(_select_kernel, (B,), scores, thresholds, thresholds, thresholds.contiguous(), mask_arg,
           keep.view(torch.uint8), idx, N, scores.stride(0), idx.stride(0),
           TOPK=False, HAS_MASK=mask is not None, BLOCK_N=block, num_warps=warps)
    width = int(keep.sum(1).max())
    return idx[:, :width].contiguous(), keep
