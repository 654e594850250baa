"""DART's selection, pure: keep the visual tokens least duplicated by a few pivot tokens.

Written for one row on tensors (no model, no hooks); :mod:`.method` feeds it a decoder layer's keys and
hidden states. Nothing here reads a device value on the host: every count comes from shapes and the budget,
so the selection runs inside a CUDA graph and adds no host-device wait.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def duplication_select(
    key_norms: torch.Tensor,
    states: torch.Tensor,
    text_norms: torch.Tensor,
    text_states: torch.Tensor,
    keep: int,
    pivot_image: int,
    pivot_text: int,
) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` visual tokens DART keeps of one row's ``n`` visual tokens.

    Args:
        key_norms: ``[n]`` L1 norm of each visual token's keys (every head) in the scoring layer.
        states: ``[n, D]`` each visual token's hidden state (the model's final norm applied).
        text_norms: ``[t]`` the same norms for the text tokens that may serve as pivots; ``-inf`` marks one
            that may not (padding, text before the image).
        text_states: ``[t, D]`` their hidden states.
        keep: tokens to keep, ``1 <= keep <= n``.
        pivot_image, pivot_text: pivots taken among the visual / text tokens by largest key norm.

    The image pivots are kept. Each pivot in turn (image pivots by decreasing norm, then text pivots) takes,
    of the visual tokens no earlier pivot took, those with the lowest cosine similarity to it: the least
    duplicated. The ``keep - image pivots`` picks are spread over the valid pivots as evenly as they go, the
    first ones in that order taking one more.
    """
    n = states.shape[0]
    device = states.device
    p_v = min(pivot_image, keep)
    image = torch.sort(key_norms, descending=True, stable=True).indices[:p_v]
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[image] = True
    picks = keep - p_v
    if picks == 0:
        return image.sort().values
    p_t = min(pivot_text, text_norms.shape[0])
    text = torch.sort(text_norms, descending=True, stable=True).indices[:p_t]
    valid = torch.cat([torch.ones(p_v, dtype=torch.bool, device=device), torch.isfinite(text_norms[text])])
    unit = F.normalize(states.float(), dim=-1)
    pivots = torch.cat([unit[image], F.normalize(text_states[text].float(), dim=-1)])
    similarity = pivots @ unit.T  # [P, n] cosine similarity of every visual token to every pivot
    count = valid.sum()
    rank = valid.long().cumsum(0) - 1
    quota = torch.where(valid, picks // count + (rank < picks % count).long(), 0)
    place = torch.arange(n, device=device)
    for j in range(pivots.shape[0]):
        order = torch.sort(similarity[j].masked_fill(taken, float("inf")), stable=True).indices
        taken |= torch.zeros_like(taken).scatter(0, order, place < quota[j])
    return torch.sort(taken.long(), descending=True, stable=True).indices[:keep].sort().values


def official_select(
    key_norms: list[float],
    states: torch.Tensor,
    visual: list[int],
    text: list[int],
    text_norms: list[float],
    keep: int,
    pivot_image: int,
    pivot_text: int,
) -> list[int]:
    """DART's official ``get_retained_image_token`` on one row, on host lists: the kept visual positions.

    ``visual`` / ``text`` are the row's token positions (the official code's sequence indices, which decide
    the order in which a Python set visits the pivots), ``states`` ``[L, D]`` indexed by those positions.
    Each pivot takes ``keep // (pivot_image + pivot_text)`` tokens, so ``image pivots + that * pivots``
    tokens stay (132 for the paper's 128), in the order a ``set`` of the pivots' positions iterates.
    """
    per_pivot = keep // (pivot_image + pivot_text)
    image = [visual[i] for i in torch.tensor(key_norms).topk(min(pivot_image, len(visual))).indices.tolist()]
    query = [text[i] for i in torch.tensor(text_norms).topk(min(pivot_text, len(text))).indices.tolist()] if text else []
    kept = set(image + query)
    valid = set(visual)
    valid.difference_update(image)
    for item in list(kept):
        candidates = list(valid)
        if not candidates:
            break
        similarity = -F.cosine_similarity(states[item].float(), states[candidates].float(), dim=-1)
        chosen = [candidates[i] for i in similarity.topk(min(per_pivot, len(candidates))).indices.tolist()]
        kept.update(chosen)
        valid.difference_update(chosen)
    kept.difference_update(query)
    return sorted(kept)
