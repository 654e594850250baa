"""Triton kernels for softmax entropy over a large vocabulary, its backward, and the window mean.

Forward, one streaming pass: each program reads a contiguous slice of one row in chunks and keeps the
online softmax state ``m = max z``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)``; rows are split
over several programs when there are too few rows to fill the GPU, and a combine kernel merges the
splits. Then ``H = log s - t / s`` (centred on ``m``, so no cancellation between ``logsumexp`` and
``sum p z``), never materialising the probabilities. The combine also saves ``lse`` and ``sum p z`` for
the backward, ``dH/dlogits = -p (z - sum p z) / T``, one more streaming pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenreduce.kernels._triton_utils import for_gpu, last_dim_contiguous, launch, pow2


@triton.jit
def _entropy_partial_kernel(
    x_ptr, m_ptr, s_ptr, t_ptr,
    V, sxr, chunk, temperature, SPLITS,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.full([], 0.0, dtype=tl.float32)
    t = tl.full([], 0.0, dtype=tl.float32)
    for v0 in range(start, end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(x_ptr + r * sxr + offs, mask=offs < end, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        # While everything seen is -inf, shift by 0 so that exp() gives 0 rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        t = alpha * (t + tl.where(s > 0, (m - shift) * s, 0.0)) + tl.sum(tl.where(e > 0, e * (z - shift), 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    out = r * SPLITS + split
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)
    tl.store(t_ptr + out, t)


@triton.jit
def _entropy_combine_kernel(
    m_ptr, s_ptr, t_ptr, h_ptr, lse_ptr, mz_ptr,
    R, SPLITS,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_S)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < SPLITS)[None, :]
    at = rows[:, None].to(tl.int64) * SPLITS + cols[None, :]
    m = tl.load(m_ptr + at, mask=ok, other=float("-inf"))
    s = tl.load(s_ptr + at, mask=ok, other=0.0)
    t = tl.load(t_ptr + at, mask=ok, other=0.0)
    top = tl.max(m, 1)
    shift = tl.where(top == float("-inf"), 0.0, top)
    alpha = tl.exp(m - shift[:, None])
    s_all = tl.sum(alpha * s, 1)
    t_all = tl.sum(tl.where(s > 0, alpha * (t + (m - shift[:, None]) * s), 0.0), 1)
    mean_shifted = t_all / s_all
    # A row whose logits are all -inf has no distribution: NaN, as the torch twin gives.
    h = tl.where(top == float("-inf"), float("nan"), tl.log(s_all) - mean_shifted)
    tl.store(h_ptr + rows, h, mask=row_ok)
    # A dead row saves lse = +inf: every p, so every gradient, is then exactly 0 in the backward, as for
    # the torch twin (whose NaN comes from a where() that passes no gradient).
    lse = tl.where(top == float("-inf"), float("inf"), shift + tl.log(s_all))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(mz_ptr + rows, shift + mean_shifted, mask=row_ok)


@triton.jit
def _entropy_backward_kernel(
    x_ptr, g_ptr, lse_ptr, mz_ptr, dx_ptr,
    V, sxr, sdr, temperature,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    z = tl.load(x_ptr + r * sxr + offs, mask=ok, other=0.0).to(tl.float32) / temperature
    p = tl.exp(z - tl.load(lse_ptr + r))
    grad = -p * (z - tl.load(mz_ptr + r)) * (tl.load(g_ptr + r) / temperature)
    # p == 0 (a -inf logit) has gradient 0, not 0 * inf; a NaN p keeps propagating.
    grad = tl.where(p == 0, 0.0, grad)
    tl.store(dx_ptr + r * sdr + offs, grad.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _window_kernel(
    e_ptr, mask_ptr, out_ptr,
    T, W, OFFSET, seb,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    full = (t < T) & (t + OFFSET + W <= T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for w in range(0, W):
        pos = t + OFFSET + w
        acc += tl.load(e_ptr + b * seb + pos, mask=full, other=0.0).to(tl.float32)
        if HAS_MASK:
            full = full & (tl.load(mask_ptr + b * T + pos, mask=full, other=0) != 0)
    tl.store(out_ptr + b * T + t, tl.where(full, acc / W, float("nan")), mask=t < T)


def _vocab_block(x: torch.Tensor, V: int) -> tuple[int, int]:
    return (pow2(V, 128, 4096), 8) if for_gpu(x) else (pow2(V, 16, 1 << 15), 4)


def _num_programs(x: torch.Tensor) -> int:
    """Programs worth launching to fill the device: a few per SM on a GPU, a handful in the interpreter."""
    if x.is_cuda:
        return 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 528 if for_gpu(x) else 4


def entropy_forward(
    logits: torch.Tensor, temperature: float, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entropy, lse, sum p z)`` per row of ``logits: [R, V]``, all float32 ``[R]``."""
    logits = last_dim_contiguous(logits)
    R, V = logits.shape
    h, lse, mz = (torch.empty(R, device=logits.device, dtype=torch.float32) for _ in range(3))
    if R == 0:
        return h, lse, mz
    block, warps = _vocab_block(logits, V)
    blocks = triton.cdiv(V, block)
    if splits is None:
        splits = max(1, min(blocks, triton.cdiv(_num_programs(logits), R), 64))
    splits = max(1, min(splits, blocks))
    chunk = triton.cdiv(blocks, splits) * block
    splits = triton.cdiv(V, chunk)
    m, s, t = (torch.empty(R, splits, device=logits.device, dtype=torch.float32) for _ in range(3))
    launch(_entropy_partial_kernel, (R, splits), logits, m, s, t, V, logits.stride(0), chunk,
           float(temperature), splits, BLOCK_V=block, num_warps=warps)
    block_r = 16 if for_gpu(logits) else pow2(R, 1, 1024)
    launch(_entropy_combine_kernel, (triton.cdiv(R, block_r),), m, s, t, h, lse, mz, R, splits,
           BLOCK_R=block_r, BLOCK_S=pow2(splits, 1), num_warps=4)
    return h, lse, mz


def entropy_backward(
    logits: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor, mz: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Gradient of the row entropies w.r.t. ``logits`` given ``grad = dL/dH`` (float32 ``[R]``)."""
    logits = last_dim_contiguous(logits)
    R, V = logits.shape
    dx = torch.empty_like(logits)
    if dx.numel() == 0:
        return dx
    block, warps = _vocab_block(logits, V)
    launch(_entropy_backward_kernel, (R, triton.cdiv(V, block)), logits, grad, lse, mz, dx,
           V, logits.stride(0), dx.stride(0), float(temperature), BLOCK_V=block, num_warps=warps)
    return dx


class TokenEntropy(torch.autograd.Function):
    """Autograd wrapper: forward and backward are the Triton kernels above."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        h, lse, mz = entropy_forward(logits, temperature)
        ctx.save_for_backward(logits, lse, mz)
        ctx.temperature = temperature
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, mz = ctx.saved_tensors
        grad = grad_h.to(torch.float32).contiguous()
        return entropy_backward(logits, grad, lse, mz, ctx.temperature), None


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Triton twin of :func:`tokenreduce.kernels.token_entropy` for ``logits: [R, V]`` (validated)."""
    return TokenEntropy.apply(logits, temperature)


def window_entropy(
    entropy: torch.Tensor, window: int, mask: torch.Tensor | None, mode: str
) -> torch.Tensor:
    """Triton twin of :func:`tokenreduce.kernels.window_entropy` (validated inputs)."""
    B, T = entropy.shape
    out = torch.empty(B, T, device=entropy.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    entropy = last_dim_contiguous(entropy)
    block = pow2(T, 16, 1024) if for_gpu(entropy) else pow2(T, 16, 1 << 14)
    mask_arg = out if mask is None else mask.contiguous().view(torch.uint8)
    launch(_window_kernel, (triton.cdiv(T, block), B), entropy, mask_arg, out, T, window,
           0 if mode == "forward" else 1, entropy.stride(0), HAS_MASK=mask is not None, BLOCK_T=block,
           num_warps=4)
    return out
