"""Pure-torch query-key attention importance: the CPU fallback and the oracle for the Triton kernels.

The twin streams over query chunks: each chunk's ``[B, Hq, c, S]`` probabilities are built, weighted and
summed into the per-key result before the next chunk, so memory stays at ``CHUNK_ELEMENTS`` probabilities
whatever the number of queries (ATP's self-modality score has every visual token as a query: a full
``N x N`` matrix per head would not fit in cache at 576 tokens and grows quadratically with video).
"""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import compute_dtype

# Logits held at once per chunk (1 MiB of fp32): they stay in a CPU core's L2 through the bias, softmax and
# weighted sum that read them after the matmul, and keep launches few on a GPU.
CHUNK_ELEMENTS = 1 << 18


def query_weights(q: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, Q]`` weight of each query in the mean: ``1 / valid count`` for valid queries, 0 otherwise."""
    B, _, Q, _ = q.shape
    if query_mask is None:
        return torch.full((B, Q), 1.0 / max(Q, 1), device=q.device, dtype=torch.float32)
    valid = query_mask.to(torch.float32)
    return valid / valid.sum(1, keepdim=True).clamp_min(1.0)


def attention_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    per_head: bool = False,
    ascending: bool = False,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    B, Hq, Q, D = q.shape
    _, Hkv, S, _ = k.shape
    G = Hq // Hkv
    dtype = compute_dtype(q, k)
    neg = float("-inf")
    kf = k.to(dtype)
    w = query_weights(q, query_mask).to(dtype)
    key_bias = None
    if key_mask is not None:
        # Masked keys score 0 before their -inf bias: a NaN or inf there cannot reach a valid key's softmax.
        # Filled along rows of the [S, D] layout (a fill of the transposed view costs ~7x more on the CPU).
        kf = (kf.clone() if kf is k else kf).masked_fill_(~key_mask[:, None, :, None], 0.0)
        # A row with no valid key gets no bias (no softmax row is all -inf) and its queries add nothing.
        valid = key_mask.any(1, keepdim=True)
        key_bias = torch.where(key_mask | ~valid, 0.0, neg).to(dtype)
        w = w * valid
    kt = kf.transpose(-1, -2)  # [B, Hkv, D, S]
    positions = query_positions
    if query_positions is not None:
        # A query sees a valid key iff one lies at or before its position (a prefix count, for all queries
        # at once). One that sees none adds nothing and sees every key instead: its softmax row is finite,
        # so no NaN reaches the sum through its zero weight.
        if key_mask is None:
            sees = query_positions >= 0
        else:
            seen = torch.gather(key_mask.cumsum(1), 1, query_positions.clamp(0, max(S - 1, 0)))
            sees = (seen > 0) & (query_positions >= 0)
        w = w * sees
        positions = torch.where(sees, query_positions, S)
    # The queries once in the compute dtype with the scale folded in (exact for a power-of-two scale, one
    # rounding per query element otherwise); those that add nothing zeroed, so a NaN in them cannot reach
    # the sum.
    qs = q.to(dtype) * scale
    if query_mask is not None or key_mask is not None or query_positions is not None:
        qs.masked_fill_((w == 0)[:, None, :, None], 0.0)
    heads = torch.zeros(B, Hq, S, device=q.device, dtype=dtype)
    flat = heads.view(B * Hq, 1, S)
    step = max(1, min(Q, (chunk_elements or CHUNK_ELEMENTS) // max(1, B * Hq * S)))
    keys = torch.arange(S, device=q.device)
    for q0 in range(0, Q, step):
        qc = qs[:, :, q0 : q0 + step]
        c = qc.shape[2]
        # Ascending causal queries: query i sits at most at S - Q + i, so this chunk's queries see no key
        # past S - Q + q0 + c; the keys after it would only be masked (about half of a self-score's logits).
        width = max(1, min(S, S - Q + q0 + c)) if ascending and query_positions is not None else S
        # Query head h reads kv head h // G: group the G query heads of a kv head along the query axis.
        logits = (qc.reshape(B, Hkv, G * c, D) @ kt[..., :width]).view(B, Hq, c, width)
        # The masks as a 0 / -inf bias shared by the heads: an in-place add is many times cheaper than a
        # broadcast masked_fill on the CPU, and x + 0 == x.
        if positions is not None:
            kb = 0.0 if key_bias is None else key_bias[:, None, :width]
            bias = torch.where(keys[None, None, :width] <= positions[:, q0 : q0 + c, None], kb, neg)
            if width < S and key_bias is not None:
                # the keys a query that sees none is given may all lie past the skipped width
                bias.masked_fill_(~sees[:, q0 : q0 + c, None], 0.0)
            logits.add_(bias[:, None])
        elif key_bias is not None:
            logits.add_(key_bias[:, None, None, :width])
        probs = torch.softmax(logits, dim=-1).view(B * Hq, c, width)
        wc = w[:, None, q0 : q0 + c].expand(B, Hq, c).reshape(B * Hq, 1, c)
        part = torch.bmm(wc, probs)
        if part.requires_grad:  # autograd: no in-place sum into the zeros
            flat = flat + torch.nn.functional.pad(part, (0, S - width))
        else:
            flat[..., :width] += part  # (an in-place baddbmm_ on the slice loops over heads)
    heads = flat.view(B, Hq, S)
    return heads if per_head else heads.mean(1)
