"""Triton kernels for query-key attention importance, two passes with fp32 accumulation.

Pass 1, one program per (query block, query head, batch): streams the keys once, keeping each query's
running max and sum of exponentials (online softmax). Pass 2, one program per (key block, query head,
batch): recomputes the logits of its keys for every query and adds the normalised probabilities,
weighted by each query's share of the mean, into its slot of ``[B, Hq, S]``. Nothing of size ``Q x S``
reaches global memory, and every output element is written by exactly one program (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenreduce.kernels._triton_utils import (
    dot_config,
    dot_rows,
    for_gpu,
    last_dim_contiguous,
    launch,
    pow2,
)
from tokenreduce.kernels.attention.naive import query_weights


@triton.jit
def _softmax_stats_kernel(
    q_ptr, k_ptr, kmask_ptr, qpos_ptr, m_ptr, l_ptr,
    Q, S, D, G, Hq, sqb, sqh, sqq, skb, skh, sks, scale,
    HAS_KEY_MASK: tl.constexpr, HAS_QPOS: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_rows = q_ptr + b * sqb + h * sqh
    k_rows = k_ptr + b * skb + (h // G) * skh
    qs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    if HAS_QPOS:
        qpos = tl.load(qpos_ptr + b * Q + qs, mask=q_ok, other=-1)
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < S
        logits = scale * dot_rows(q_rows + qs.to(tl.int64) * sqq, k_rows + ss.to(tl.int64) * sks, q_ok, s_ok,
                                  0.0, 0.0, D, False, TO_FP32, PRECISION, BLOCK_Q, BLOCK_S, BLOCK_D)
        keep = s_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(kmask_ptr + b * S + ss, mask=s_ok, other=0) != 0)
        allowed = keep[None, :]
        if HAS_QPOS:
            allowed = allowed & (ss[None, :] <= qpos[:, None])
        logits = tl.where(allowed, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        # While every key seen so far is masked the max is -inf; shift by 0 then so exp() gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        denom = denom * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        m = m_new
    row = (b * Hq + h) * Q + qs
    tl.store(m_ptr + row, m, mask=q_ok)
    tl.store(l_ptr + row, denom, mask=q_ok)


@triton.jit
def _head_probs_kernel(
    q_ptr, k_ptr, kmask_ptr, qpos_ptr, m_ptr, l_ptr, w_ptr, out_ptr,
    Q, S, D, G, Hq, sqb, sqh, sqq, skb, skh, sks, scale,
    HAS_KEY_MASK: tl.constexpr, HAS_QPOS: tl.constexpr, TO_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_rows = q_ptr + b * sqb + h * sqh
    k_rows = k_ptr + b * skb + (h // G) * skh
    ss = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    keep = s_ok
    if HAS_KEY_MASK:
        keep = keep & (tl.load(kmask_ptr + b * S + ss, mask=s_ok, other=0) != 0)
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q)
        q_ok = qs < Q
        logits = scale * dot_rows(q_rows + qs.to(tl.int64) * sqq, k_rows + ss.to(tl.int64) * sks, q_ok, s_ok,
                                  0.0, 0.0, D, False, TO_FP32, PRECISION, BLOCK_Q, BLOCK_S, BLOCK_D)
        row = (b * Hq + h) * Q + qs
        m = tl.load(m_ptr + row, mask=q_ok, other=0.0)
        denom = tl.load(l_ptr + row, mask=q_ok, other=0.0)
        w = tl.load(w_ptr + b * Q + qs, mask=q_ok, other=0.0)
        p = tl.exp(logits - m[:, None]) / denom[:, None]
        # denom == 0: the query saw no valid key (zero probability); a NaN still propagates, as in torch.
        use = (w > 0) & (denom != 0)
        allowed = use[:, None] & keep[None, :]
        if HAS_QPOS:
            qpos = tl.load(qpos_ptr + b * Q + qs, mask=q_ok, other=-1)
            allowed = allowed & (ss[None, :] <= qpos[:, None])
        acc += tl.sum(tl.where(allowed, p * w[:, None], 0.0), 0)
    tl.store(out_ptr + (b * Hq + h) * S + ss, acc, mask=s_ok)


def attention_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    per_head: bool = False,
) -> torch.Tensor:
    """Triton twin of :func:`tokenreduce.kernels.attention_importance` (inputs already validated)."""
    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k)
    B, Hq, Q, D = q.shape
    _, Hkv, S, _ = k.shape
    heads = torch.zeros(B, Hq, S, device=q.device, dtype=torch.float32)
    if heads.numel() == 0 or Q == 0:
        return heads if per_head else heads.mean(1)
    w = query_weights(q, query_mask).contiguous()
    m = torch.empty(B, Hq, Q, device=q.device, dtype=torch.float32)
    denom = torch.empty_like(m)
    kmask = m if key_mask is None else key_mask.contiguous().view(torch.uint8)
    qpos = m if query_positions is None else query_positions.to(torch.int64).contiguous()
    if for_gpu(q):
        # Largest tiles without register spills on sm_90 (tests/kernels/aot_compile.py).
        if q.dtype == k.dtype == torch.float32:
            bq, bs, bd, warps, stages = pow2(Q, 16, 32), 64, pow2(D, 16, 32), 4, 2
        else:
            bq, bs, bd, warps, stages = pow2(Q, 16, 64), 64, pow2(D, 16, 64), 8, 2
    else:
        bq, bs, bd, warps, stages = pow2(Q, 16, 64), pow2(S, 16, 1024), pow2(D, 16, 512), 4, 1
    common = (Q, S, D, Hq // Hkv, Hq, q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2), float(scale))
    to_fp32, precision = dot_config(q, k)
    meta = dict(HAS_KEY_MASK=key_mask is not None, HAS_QPOS=query_positions is not None, TO_FP32=to_fp32, PRECISION=precision,
                BLOCK_Q=bq, BLOCK_S=bs, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    launch(_softmax_stats_kernel, (triton.cdiv(Q, bq), Hq, B), q, k, kmask, qpos, m, denom, *common, **meta)
    launch(_head_probs_kernel, (triton.cdiv(S, bs), Hq, B), q, k, kmask, qpos, m, denom, w, heads, *common, **meta)
    return heads if per_head else heads.mean(1)
