"""Which tokens of one crop survive, and how the dropped ones may be merged into them.

Given the crop's budget ``k`` (from its information density), TCC keeps the union of

* *global-information* tokens: outliers of the deep-layer [CLS] attention (above ``Q3 + f * IQR``), the
  tokens the encoder itself singles out as summarising the crop;
* *local-information* tokens: drawn without replacement from the shallow-layer [CLS]-patch attention
  read as a probability distribution, so that detail-rich regions are sampled more often but every region
  has a chance (``sampling="topk"`` takes the most probable instead, deterministically).

Dropped tokens may be folded into their most similar kept token by a weighted mean.
"""

from __future__ import annotations

import torch

from tokenreduce import kernels
from tokenreduce.ops.selection import iqr_outliers

# Floor added to the sampling weights so that every token can be drawn (zero or NaN attention included).
PROBABILITY_FLOOR = 1e-12


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest scores, ascending (ties: lower position first)."""
    if k <= 0 or scores.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return kernels.topk_select(scores.float()[None], int(k)).indices[0]


def sampling_weights(attention: torch.Tensor) -> torch.Tensor:
    """The shallow-layer attention as non-negative sampling weights (NaN -> 0, then a tiny floor)."""
    w = torch.nan_to_num(attention.float(), nan=0.0).clamp_min(0.0)
    return w + PROBABILITY_FLOOR


def choose_tokens(deep: torch.Tensor, shallow: torch.Tensor, k: int, *, global_tokens: bool, iqr_factor: float,
                  sampling: str, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Kept positions (ascending) among one crop's ``n`` tokens, and how many are global-information tokens.

    Args:
        deep: ``[n]`` deep-layer [CLS] attention of the crop's tokens.
        shallow: ``[n]`` shallow-layer [CLS] attention (the sampling distribution).
        k: the crop's budget (``0 <= k <= n``).
        global_tokens: keep the IQR outliers of ``deep`` (at most ``k`` of them, the highest).
        iqr_factor: outliers lie above ``Q3 + iqr_factor * IQR``.
        sampling: ``"sample"`` (seeded, without replacement) or ``"topk"``.
        generator: the sampler's generator (CPU).
    """
    n = deep.numel()
    k = max(0, min(int(k), n))
    device = deep.device
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    n_global = 0
    if global_tokens and k > 0 and n > 0:
        scores = torch.nan_to_num(deep.float(), nan=float("-inf"))
        outliers = iqr_outliers(torch.nan_to_num(deep.float(), nan=0.0), iqr_factor).nonzero().flatten()
        if outliers.numel() > k:
            outliers = outliers[top_positions(scores[outliers], k)]
        chosen[outliers] = True
        n_global = int(outliers.numel())
    need = k - n_global
    if need > 0:
        rest = (~chosen).nonzero().flatten()
        weights = sampling_weights(shallow[rest])
        if sampling == "topk":
            picks = top_positions(weights, need)
        else:
            picks = torch.multinomial(weights.cpu(), need, replacement=False, generator=generator).to(device)
        chosen[rest[picks]] = True
    return chosen.nonzero().flatten(), n_global


def merge_dropped(x: torch.Tensor, similarity: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor,
                  metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold every dropped token of a crop into its most similar kept token.

    Args:
        x: ``[n, D]`` the crop's tokens (what the LLM reads).
        similarity: ``[n, d]`` the features similarity is measured on (shallow keys / hidden states).
        kept: ``[m]`` kept positions.
        weights: ``[n]`` non-negative token weights.
        metric: ``"cosine"`` or ``"correlation"``.

    Returns:
        ``(outputs [m, D], slot [n])``: kept token ``i`` becomes the ``weights``-weighted mean of itself
        and the tokens assigned to it; ``slot`` is each token's output row.
    """
    n = x.shape[0]
    slot = torch.full((n,), -1, dtype=torch.long, device=x.device)
    slot[kept] = torch.arange(kept.numel(), device=x.device)
    if kept.numel() == 0:
        return x[:0], slot
    if kept.numel() == n:
        return x[kept], slot
    # the n - m dropped positions in order (a stable sort puts them first): no host read
    dropped = torch.sort((slot >= 0).to(torch.uint8), stable=True).indices[: n - kept.numel()]
    sim = kernels.pairwise_similarity(similarity[dropped].float()[None], similarity[kept].float()[None],
                                      metric=metric)[0]
    target = torch.nan_to_num(sim, nan=float("-inf")).argmax(dim=1)
    slot[dropped] = target
    w = weights.to(torch.float32)
    sums = (w[kept, None] * x[kept].float()).index_add(0, target, w[dropped, None] * x[dropped].float())
    totals = w[kept].clone().index_add(0, target, w[dropped])
    return (sums / totals.clamp_min(1e-20)[:, None]).to(x.dtype), slot


def _ranks(keys: torch.Tensor) -> torch.Tensor:
    """Each position's rank when ``keys`` are sorted ascending (ties: lower position first)."""
    order = torch.sort(keys, stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=keys.device))


def choose_tokens_on_device(deep: torch.Tensor, shallow: torch.Tensor, k: torch.Tensor, *, global_tokens: bool,
                            iqr_factor: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_tokens` with a budget ``k`` that stays on the device (a 0-dim tensor): a kept mask
    ``[n]`` (``k`` tokens, ``k <= n``) and the number of global-information tokens, both on the device.

    ``noise``: ``[n]`` draws of Exp(1) for ``"sample"`` (``None``: ``"topk"``). The local tokens are the
    ``need`` largest ``weight / noise`` among the tokens not yet chosen, the j-th of them divided by the
    j-th draw: how ``torch.multinomial`` draws without replacement, so the same tokens as
    :func:`choose_tokens` from the same generator state. The crop takes ``n`` draws where
    :func:`choose_tokens` takes ``n - globals`` (none when ``need`` is 0), so the crops after one with
    global tokens see other draws.
    """
    n = deep.numel()
    device = deep.device
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    n_global = torch.zeros((), dtype=torch.long, device=device)
    if global_tokens and n > 0:
        outliers = iqr_outliers(torch.nan_to_num(deep.float(), nan=0.0), iqr_factor)
        scores = torch.nan_to_num(deep.float(), nan=float("-inf"))
        # outliers first, by decreasing score, lower position first on ties: the k first are kept
        by_score = torch.sort(-scores, stable=True).indices
        order = by_score[torch.sort((~outliers[by_score]).to(torch.uint8), stable=True).indices]
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))
        chosen = outliers & (rank < k)
        n_global = chosen.sum()
    need = k - n_global
    weights = sampling_weights(shallow)
    if noise is not None:
        # the j-th token not chosen gets the j-th draw, as torch.multinomial over those tokens gives it
        nth = (torch.cumsum((~chosen).long(), 0) - 1).clamp_min(0)
        noise = noise.gather(0, nth)
    key = weights if noise is None else weights / noise
    key = torch.where(chosen, float("-inf"), key)
    local = ~chosen & (_ranks(-key) < need)
    return chosen | local, n_global


def merge_into_kept(x: torch.Tensor, similarity: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor,
                    metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_dropped` for a kept mask ``[n]`` whose count the host does not know: every dropped token
    goes to its most similar kept token. Returns ``(target [n], merged [n, D])``: each token's kept
    position (itself when kept; -1 when the crop keeps none) and, at every kept position, the
    ``weights``-weighted mean of the token and those assigned to it (other rows are left as ``x``)."""
    n = x.shape[0]
    positions = torch.arange(n, device=x.device)
    sim = kernels.pairwise_similarity(similarity.float()[None], metric=metric)[0]
    # kept columns only; a NaN similarity still beats a dropped column, so a kept token is always found
    sim = torch.where(kept[None, :], torch.nan_to_num(sim, nan=-3.0e38), float("-inf"))
    target = torch.where(kept, positions, sim.argmax(dim=1))
    target = torch.where(kept.any(), target, -1)
    w = weights.to(torch.float32)
    dropped = ~kept & (target >= 0)
    into = torch.where(dropped, target, positions)  # kept tokens and unassigned ones add to themselves...
    contrib = torch.where(dropped, w, 0.0)  # ...with no weight
    sums = (torch.where(kept, w, 0.0)[:, None] * x.float()).index_add(0, into, contrib[:, None] * x.float())
    totals = torch.where(kept, w, 0.0).index_add(0, into, contrib)
    merged = torch.where(kept[:, None], (sums / totals.clamp_min(1e-20)[:, None]).to(x.dtype), x)
    return target, merged
