"""Pure-torch query-key attention importance: the CPU fallback and the oracle for the Triton kernels."""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import compute_dtype


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
) -> torch.Tensor:
    B, Hq, Q, D = q.shape
    _, Hkv, S, _ = k.shape
    dtype = compute_dtype(q, k)
    # Query head h reads kv head h // G: group the G query heads of a kv head along the query axis.
    qg = q.to(dtype).reshape(B, Hkv, (Hq // Hkv) * Q, D)
    logits = (qg @ k.to(dtype).transpose(-1, -2)).reshape(B, Hq, Q, S) * scale
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, :].expand(B, Q, S)
    if query_positions is not None:
        causal = torch.arange(S, device=q.device)[None, None, :] <= query_positions[:, :, None]
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if allowed is not None:
        # A query with no valid key is all -inf: softmax gives NaN; it gets zero probability instead.
        probs = torch.where(allowed.any(-1)[:, None, :, None], probs, torch.zeros_like(probs))
    w = query_weights(q, query_mask).to(dtype)[:, None, :, None]
    heads = torch.where(w > 0, probs * w, torch.zeros_like(probs)).sum(2)
    return heads if per_head else heads.mean(1)
