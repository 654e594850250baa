"""Attention probabilities of selected queries over a key cache, reduced to one importance per key.

``attention_importance`` is the score FastV / PyramidDrop / ATP-style pruning ranks visual tokens by: the
softmax attention the chosen queries (e.g. the last text token, or all instruction tokens) pay to every
key, averaged over query heads and valid queries. ``cls_attention`` is the vision-encoder variant: the
[CLS] query's attention over the patch keys (FasterVLM / VisionZip-style).
"""

from __future__ import annotations

import torch

from tokenreduce.kernels._backend import check_mask, check_tensor, select_backend
from tokenreduce.kernels.attention import naive


def attention_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    per_head: bool = False,
    ascending: bool = False,
) -> torch.Tensor:
    """Mean softmax attention of the queries ``q`` over the keys ``k``, one score per key.

    ``probs[b, h, i, s] = softmax_s(scale * q[b, h, i] . k[b, h // G, s])`` over the valid keys, then
    averaged over valid queries ``i`` and over heads ``h``. Scores of a row sum to 1 when it has a valid
    query and a valid key.

    Args:
        q: ``[B, Hq, Q, D]`` queries (post-RoPE, as the model attends with them).
        k: ``[B, Hkv, S, D]`` keys; grouped-query attention with ``Hq = G * Hkv``, query head ``h`` reads
            kv head ``h // G``.
        scale: logit scale; ``None`` means ``D ** -0.5``.
        key_mask: ``[B, S]`` bool, valid keys; masked keys get probability exactly 0. A row with no valid
            key gets all-zero probabilities.
        query_mask: ``[B, Q]`` bool, valid queries; masked queries add nothing (even if they hold NaN). A
            row with no valid query scores 0 everywhere.
        query_positions: ``[B, Q]`` int, causal attention: query ``i`` sees only keys ``s <= positions[b, i]``
            (the columns of the queries in a decoder's sequence). A query that sees no valid key adds 0.
        per_head: return ``[B, Hq, S]`` (mean over queries only) instead of ``[B, S]``. Same cost: the
            head mean is taken from it.
        ascending: a promise about ``query_positions``: query ``i``'s position is at most ``S - Q + i``
            (true when the positions strictly increase and stay below ``S``, as the columns of distinct
            tokens of one sequence do, left padding at 0 included). The torch path then skips the keys no
            query of a chunk can see (half the logits of every visual token scoring every other). A broken
            promise drops keys the queries would see; ignored without ``query_positions``.

    Returns:
        ``[B, S]`` (or ``[B, Hq, S]``) float32 (float64 for float64 inputs on the torch path).
    """
    op = "attention_importance"
    check_tensor(op, "q", q, 4)
    check_tensor(op, "k", k, 4)
    B, Hq, Q, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{op}: `k` must be [B={B}, Hkv, S, D={D}], got {tuple(k.shape)}")
    if k.device != q.device:
        raise ValueError(f"{op}: `k` is on {k.device} but `q` is on {q.device}; move it there")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    check_mask(op, "key_mask", key_mask, (B, k.shape[2]), q.device)
    check_mask(op, "query_mask", query_mask, (B, Q), q.device)
    if query_positions is not None and (query_positions.shape != (B, Q) or query_positions.is_floating_point()):
        raise ValueError(f"{op}: `query_positions` must be an integer [B={B}, Q={Q}] tensor, got "
                         f"{query_positions.dtype} {tuple(query_positions.shape)}")
    scale = D**-0.5 if scale is None else float(scale)
    if select_backend(op, q, k) == "triton":
        from tokenreduce.kernels.attention import triton

        return triton.attention_importance(
            q, k, scale=scale, key_mask=key_mask, query_mask=query_mask, query_positions=query_positions,
            per_head=per_head,
        )
    return naive.attention_importance(
        q, k, scale=scale, key_mask=key_mask, query_mask=query_mask, query_positions=query_positions,
        per_head=per_head, ascending=ascending,
    )


def cls_attention(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    drop_cls: bool = True,
    per_head: bool = False,
) -> torch.Tensor:
    """Attention of the [CLS] query over the keys of a vision encoder layer, mean over heads.

    The softmax runs over ALL ``N`` keys, the CLS key (index 0) included, as the encoder computes it.
    With ``drop_cls=True`` (default) the CLS column is then dropped and the ``N - 1`` patch probabilities
    are returned as they are (not renormalised: they sum to ``1 - p(CLS)``).

    Args:
        q_cls: ``[B, H, D]`` the CLS token's query in every head.
        k: ``[B, Hkv, N, D]`` keys, CLS first (``H`` a multiple of ``Hkv``; plain MHA has ``Hkv = H``).
        scale: logit scale; ``None`` means ``D ** -0.5``.
        key_mask: ``[B, N]`` bool valid keys (e.g. padded patch sequences).
        drop_cls: drop the CLS column (returns ``[B, N - 1]``) or keep it (``[B, N]``).
        per_head: keep the head axis: ``[B, H, N - 1]`` (or ``[B, H, N]``).

    Returns:
        float32 probabilities, patch ``j`` of the result being key ``j + 1`` when ``drop_cls``.
    """
    check_tensor("cls_attention", "q_cls", q_cls, 3)
    probs = attention_importance(q_cls[:, :, None, :], k, scale=scale, key_mask=key_mask, per_head=per_head)
    return probs[..., 1:] if drop_cls else probs


__all__ = ["attention_importance", "cls_attention"]
