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
    kf = k.to(dtype)
    if key_mask is not None:
        # Masked keys score 0 before their -inf bias: a NaN or inf there cannot reach a valid key's softmax.
        # Filled along rows of the [S, D] layout (a fill of the transposed view costs ~7x more on the CPU).
        kf = (kf.clone() if kf is k else kf).masked_fill_(~key_mask[:, None, :, None], 0.0)
    kt = kf.transpose(-1, -2)  # [B, Hkv, D, S]
    w = query_weights(q, query_mask).to(dtype)
    heads = torch.zeros(B, Hq, S, device=q.device, dtype=dtype)
    step = max(1, min(Q, (chunk_elements or CHUNK_ELEMENTS) // max(1, B * Hq * S)))
    keys = torch.arange(S, device=q.device)
    # One logits buffer for every chunk: no fresh allocation (and page faults) per chunk.
    buffer = torch.empty(B * Hq * step * S, device=q.device, dtype=dtype)
    for q0 in range(0, Q, step):
        wc = w[:, q0 : q0 + step]
        # a query that adds nothing (masked, weight 0) is zeroed, so a NaN in it cannot reach the sum
        qc = q[:, :, q0 : q0 + step].to(dtype)
        if query_mask is not None:
            qc = qc.masked_fill((wc == 0)[:, None, :, None], 0.0)
        c = qc.shape[2]
        # Ascending causal queries: query i sits at most at S - Q + i, so this chunk's queries see no key
        # past S - Q + q0 + c; the keys after it would only be masked (about half of a self-score's logits).
        width = max(1, min(S, S - Q + q0 + c)) if ascending and query_positions is not None else S
        # Query head h reads kv head h // G: group the G query heads of a kv head along the query axis.
        logits = buffer[: B * Hq * c * width].view(B, Hkv, G * c, width)
        torch.matmul(qc.reshape(B, Hkv, G * c, D), kt[..., :width], out=logits)
        logits = logits.view(B, Hq, c, width).mul_(scale)
        allowed = None
        if key_mask is not None:
            allowed = key_mask[:, None, :width].expand(B, c, width)
        if query_positions is not None:
            causal = keys[None, None, :width] <= query_positions[:, q0 : q0 + c, None]
            allowed = causal if allowed is None else allowed & causal
        if allowed is not None:
            # A query with no valid key would be all -inf (NaN softmax): it sees every key instead and
            # adds nothing (weight 0). The mask is added as a 0 / -inf bias, shared by the heads: an
            # in-place add is many times cheaper than a broadcast masked_fill on the CPU, and x + 0 == x.
            sees = allowed.any(-1)
            wc = wc * sees.to(dtype)
            bias = torch.where(allowed | ~sees[..., None], 0.0, float("-inf")).to(dtype)
            logits.add_(bias[:, None])
        probs = torch.softmax(logits, dim=-1)
        heads[..., :width] += (wc[:, None, None, :] @ probs).squeeze(2)
    return heads if per_head else heads.mean(1)
